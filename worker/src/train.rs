//! The trial loop: the recipe's three steps for one cell of the grid.
//!
//! 1. Build the backbone with a new head of `classes` outputs and load its weights
//!    (`model.weights`: random, a file, or `<weights dir>/<backbone>.safetensors`).
//! 2. Feature extraction for `fe_epochs`: only the new head trains (`requires_grad` is false
//!    everywhere else), with Adam at `training.feature_extraction.lr`; the model stays in
//!    training mode, so BatchNorm running statistics keep updating unless
//!    `training.freeze_bn_stats` holds them (BatchNorm layers then run in evaluation mode).
//! 3. Fine-tuning for `ft_epochs`: every parameter trains, with a new Adam whose learning rate
//!    per parameter is the trial's `lr_decay` applied to the backbone's layer groups
//!    (`training.fine_tuning.default_lr` for parameters in no group).
//!
//! Every epoch is one pass over the training set in a seeded random order, with augmentation,
//! then a validation pass in evaluation mode; its [`EpochMetrics`] go to a callback that may stop
//! the trial. All randomness derives from `training.seed` and the (global, 1-based) epoch number
//! — never from the trial's position in the grid — so equal trials are comparable, an epoch does
//! not depend on how many epochs follow it, and on CPU a trial's metrics are bit-identical from
//! run to run.
//!
//! With several devices ([`TrainOptions::devices`]) the trial trains data-parallel: one replica
//! per device, gradients summed with [`crate::dist`]; see [`Trainer`]. One device trains
//! exactly as without data parallelism, bit for bit.
//!
//! **Feature extraction costs what it must.** The frozen backbone ([`Model::features`]) runs
//! under `no_grad`: it records no autograd graph, and its parameters, which do not require
//! gradients, get neither gradient buffers nor optimizer state. When its output is moreover a
//! function of the image alone — BatchNorm frozen (`freeze_bn_stats`), no augmentation in
//! the phase (`training.feature_extraction.augment: false`, or none at all), a backbone without
//! stochastic depth ([`Model::features_are_pure`]) — the backbone
//! runs once per image for the whole phase ([`FeatureCache`]) and the head trains on the stored
//! features. Libtorch's kernels choose their algorithm by shape, so a sample's features depend
//! on the size of the batch it is computed in (not on the other samples in it, nor on its place
//! among them — see [`Model::features`]): the training
//! features are computed in batches of exactly one size: the size of batch (data parallel, of
//! a replica's part of a global batch) that covers the most samples of an epoch — usually the
//! training batch size ([`batching::feature_cache_batch`]) — and a batch of another size
//! (usually the epoch's last) is computed afresh every epoch; validation features are computed
//! in the same batches as validation. Data parallel, each replica computes the features of a part of
//! the training set and the parts are broadcast to all, so that each holds every row whichever
//! replica an epoch hands a sample to (the replicas' devices must compute the same bits, which
//! the cache's check tests); each caches its own part of validation. A cached run is therefore
//! bit-identical to an uncached one (`worker/tests/trainer.rs`, with one replica and several).
//! [`TrainOptions::feature_cache`] (`SWEEP_FEATURE_CACHE=off`) turns it off.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use sweep_core::leaderboard::{EpochMetrics, Phase};
use sweep_core::spec::{Augment, SweepSpec, TrainingSpec, Weights};
use sweep_core::{Backbone, LrDecay, Trial, batching};
use tch::{Device, Kind, Reduction, TchError, Tensor};

use crate::adam::{Adam, AdamConfig};
use crate::augment;
use crate::data::prefetch::{self, Shard, TrainBatches};
use crate::data::{self, DataError};
use crate::dist::{self, AbortHandle, AllReduce, BUCKET_BYTES, DistError, all_reduce_gradients, broadcast_tensors};
use crate::model::{ForwardMode, Model, ModelError};
use crate::resume::{OptimizerEntry, TrainingState};
use crate::rng::{Rng, STREAM_AUGMENT, STREAM_SHUFFLE};

/// Environment variable naming the directory of `<backbone>.safetensors` ImageNet weights,
/// used when [`TrainOptions::weights_dir`] is not set.
pub const WEIGHTS_DIR_ENV: &str = "SWEEP_WEIGHTS_DIR";

/// Why a trial did not complete: the class decides what happens next (fail the trial, try
/// again, start over without the resume point), and it is never read back from the text.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// Will fail again on any attempt: a bad dataset, missing or mismatched weights, a setting
    /// the backbone cannot take.
    #[error(transparent)]
    Permanent(Failure),
    /// Worth another attempt: out of memory, a device error, an artifact store that did not
    /// answer.
    #[error(transparent)]
    Retryable(Failure),
    /// Stopped on request (the callback returned [`Control::Stop`], or the cancel flag was set).
    #[error("cancelled")]
    Cancelled,
    /// The resume point handed to the trainer does not fit the trial (other shapes or names, more
    /// epochs than the trial has): the attempt can start from the beginning instead. Retryable.
    #[error("resume point: {0}")]
    ResumePoint(#[source] Failure),
}

/// What went wrong: a message in context and, when another error caused it, that error (its
/// text follows the message; [`std::error::Error::source`] gives the error itself).
#[derive(Debug, Clone)]
pub struct Failure {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure { message: message.into(), source: None }
    }

    /// `context`, caused by `source`.
    pub fn caused(context: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Failure {
        Failure { message: context.into(), source: Some(Arc::new(source)) }
    }

    /// The same failure, said to have happened `at` (a step, a replica).
    pub fn at(self, at: &str) -> Failure {
        Failure { message: format!("{at}: {}", self.message), ..self }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}: {source}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Failure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Failures are equal when they say the same (for tests; nothing decides by the text).
impl PartialEq for Failure {
    fn eq(&self, other: &Failure) -> bool {
        self.to_string() == other.to_string()
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::new(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Failure {
        Failure::new(message)
    }
}

impl TrainError {
    /// True for [`TrainError::Permanent`].
    pub fn is_permanent(&self) -> bool {
        matches!(self, TrainError::Permanent(_))
    }

    pub fn permanent(message: impl Into<Failure>) -> TrainError {
        TrainError::Permanent(message.into())
    }

    pub fn retryable(message: impl Into<Failure>) -> TrainError {
        TrainError::Retryable(message.into())
    }

    pub fn resume_point(message: impl Into<Failure>) -> TrainError {
        TrainError::ResumePoint(message.into())
    }

    /// A retryable failure: `context`, caused by `source`.
    pub fn retryable_from(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TrainError {
        TrainError::Retryable(Failure::caused(context, source))
    }

    /// A permanent failure: `context`, caused by `source`.
    pub fn permanent_from(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> TrainError {
        TrainError::Permanent(Failure::caused(context, source))
    }

    /// Classifies a libtorch error: memory and device failures are retryable, anything else
    /// (shapes, kinds, invalid arguments) permanent.
    pub fn from_torch(context: &str, e: TchError) -> TrainError {
        // libtorch appends a C++ stack trace to its messages; keep what a user can read.
        let text = match e {
            TchError::Torch(s) => s,
            other => other.to_string(),
        };
        let text = text.split("\nException raised from").next().unwrap_or_default().trim_end();
        let message = format!("{context}: {text}");
        let lower = message.to_lowercase();
        let transient = ["out of memory", "cuda", "cudnn", "cublas", "nccl", "device-side", "hip error"];
        if transient.iter().any(|t| lower.contains(t)) {
            TrainError::retryable(message)
        } else {
            TrainError::permanent(message)
        }
    }
}

impl From<DataError> for TrainError {
    fn from(e: DataError) -> Self {
        if e.is_permanent() {
            TrainError::permanent_from("dataset", e)
        } else {
            TrainError::retryable_from("dataset", e)
        }
    }
}

impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Torch(t) => TrainError::from_torch("model", t),
            other => TrainError::Permanent(Failure::caused("model", other)),
        }
    }
}

/// What the epoch callback tells the trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop the trial now; [`run_trial`] returns [`TrainError::Cancelled`].
    Stop,
}

/// What the trainer reports after each epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    pub metrics: EpochMetrics,
    /// Parameters of the model being trained (new head included).
    pub parameters: u64,
}

/// How and where to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Training devices, one replica of the model on each: `[Device::Cpu]`,
    /// `[Device::Cuda(0)]`, or several for data-parallel training — CPU slots
    /// (`[Device::Cpu, Device::Cpu]`) or distinct CUDA devices. The global batch is
    /// `training.batch_size` × the number of devices.
    pub devices: Vec<Device>,
    /// Directory of `<backbone>.safetensors` ImageNet weights; when `None`, the
    /// [`WEIGHTS_DIR_ENV`] environment variable.
    pub weights_dir: Option<PathBuf>,
    /// Checked before every batch: when set, the trial stops with [`TrainError::Cancelled`]
    /// (how a daemon stops a trial between epoch reports).
    pub cancel: Option<Arc<AtomicBool>>,
    /// Continue from this state (a [`crate::resume`] point) instead of starting from the
    /// initial weights: the next epoch is `epochs_done + 1`, and the run goes on exactly as
    /// if it had never stopped.
    /// (In a mutex only because tensors are not `Sync`; every replica reads it.)
    pub resume: Option<Arc<Mutex<TrainingState>>>,
    /// Told what the attempt does before its first epoch (pretraining its backbone, or waiting
    /// for another worker's); `true` back means stop. The daemon sends it to the coordinator.
    pub progress: Option<Progress>,
    /// Compute the frozen backbone's features once per feature-extraction phase when that
    /// gives the same bits (see the module documentation). Default: on, unless
    /// [`FEATURE_CACHE_ENV`] is `off`, `0`, `false` or `no`.
    pub feature_cache: bool,
}

/// Environment variable that turns the feature cache off (`off`, `0`, `false` or `no`).
pub const FEATURE_CACHE_ENV: &str = "SWEEP_FEATURE_CACHE";

/// Whether [`FEATURE_CACHE_ENV`] leaves the feature cache on.
pub fn feature_cache_default() -> bool {
    std::env::var(FEATURE_CACHE_ENV)
        .map(|v| !matches!(v.trim().to_ascii_lowercase().as_str(), "off" | "0" | "false" | "no"))
        .unwrap_or(true)
}

/// Where pretraining stands, told as it goes; answers whether to stop.
#[derive(Clone)]
pub struct Progress(pub Arc<dyn Fn(&sweep_core::records::PretrainProgress) -> bool + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress(..)")
    }
}

impl TrainOptions {
    /// Tells [`TrainOptions::progress`], if any; whether to stop.
    pub fn tell(&self, p: &sweep_core::records::PretrainProgress) -> bool {
        self.progress.as_ref().is_some_and(|f| (f.0)(p))
    }

    /// Options for one `device`, no weights directory (the environment variable applies), no
    /// cancel flag.
    pub fn new(device: Device) -> TrainOptions {
        TrainOptions::data_parallel(vec![device])
    }

    /// Options for one replica on each of `devices` (see [`TrainOptions::devices`]).
    pub fn data_parallel(devices: Vec<Device>) -> TrainOptions {
        TrainOptions {
            devices,
            weights_dir: None,
            cancel: None,
            resume: None,
            progress: None,
            feature_cache: feature_cache_default(),
        }
    }

    fn weights_dir(&self) -> Option<PathBuf> {
        self.weights_dir.clone().or_else(|| std::env::var_os(WEIGHTS_DIR_ENV).map(PathBuf::from))
    }
}

fn cancelled(cancel: &Option<Arc<AtomicBool>>) -> bool {
    cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
}

/// A completed trial.
#[derive(Debug, Clone, PartialEq)]
pub struct TrialSummary {
    /// One row per epoch, in order.
    pub metrics: Vec<EpochMetrics>,
    /// Parameters of the trained model.
    pub parameters: u64,
}

/// Sets the number of threads libtorch uses inside one operation (process-wide).
pub fn set_intra_op_threads(n: usize) {
    tch::set_num_threads(n.clamp(1, i32::MAX as usize) as i32);
}

/// Limits the process to `n` compute threads: libtorch's intra-op threads and rayon's pool,
/// which decodes images and runs the CPU augmentation ([`crate::augment::cpu`]). Call it before
/// anything uses rayon; a pool already set up stays as it is, with a warning.
pub fn set_threads(n: usize) {
    set_intra_op_threads(n);
    if let Err(e) = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global() {
        tracing::warn!("{n} threads: the decode and augmentation pool was already set up ({e})");
    }
}

/// The weights file `weights` names for `backbone`, or `None` for random initialisation.
/// A file that does not exist is a permanent error naming it (and, for ImageNet weights,
/// saying how to create it).
pub fn weights_file(
    weights: &Weights,
    backbone: Backbone,
    weights_dir: Option<&Path>,
) -> Result<Option<PathBuf>, TrainError> {
    const HOW: &str = "create it with tools/export_torchvision_weights.py, which exports torchvision's ImageNet weights to .safetensors (ImageNet weights are licensed for non-commercial research only)";
    match weights {
        Weights::None => Ok(None),
        Weights::File(p) => {
            let path = PathBuf::from(p);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(TrainError::permanent(format!(
                    "weights file {} (model.weights) does not exist on this worker",
                    path.display()
                )))
            }
        }
        Weights::ImageNet => {
            let file = format!("{}.safetensors", backbone.name());
            let Some(dir) = weights_dir else {
                return Err(TrainError::permanent(format!(
                    "model.weights is `imagenet` but this worker has no weights directory: set {WEIGHTS_DIR_ENV} (or the worker's weights-dir option) to a directory holding {file}; {HOW}"
                )));
            };
            let path = dir.join(&file);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(TrainError::permanent(format!(
                    "ImageNet weights for {} not found: {} does not exist; {HOW}",
                    backbone.name(),
                    path.display()
                )))
            }
        }
    }
}

/// The fine-tuning learning rate of each of `model`'s parameters (in
/// [`Model::named_parameters`] order): `decay` over the backbone's layer groups, `default_lr`
/// for parameters in no group.
pub fn fine_tuning_lrs(model: &Model, decay: &LrDecay, default_lr: f64) -> Vec<f64> {
    let lrs = decay.group_lrs(model.backbone().layer_groups().len());
    model.parameter_groups().into_iter().map(|g| g.and_then(|i| lrs.get(i).copied()).unwrap_or(default_lr)).collect()
}

/// Indices of the batches of one pass over `order`: chunks of `batch_size`, the last one merged
/// into the one before when it would hold a single sample (BatchNorm cannot normalise one
/// sample in training mode).
pub fn batches(order: &[i64], batch_size: usize) -> Vec<&[i64]> {
    batching::batch_ranges(order.len(), batch_size).into_iter().map(|r| &order[r]).collect()
}

pub use sweep_core::batching::{shard_ranges, split_evenly};

/// Seed-derivation tag of the dropout streams of replicas other than rank 0 (rank 0 keeps the
/// single-replica stream, so one replica trains exactly as before data parallelism).
const STREAM_REPLICA: u64 = 0x7265_706c; // "repl"

/// A failure injected into one replica, to test how the others stop (see
/// [`Trainer::inject_fault`]). Never set by the worker.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The replica that fails.
    pub rank: usize,
    /// Before which training step (0-based) of the next epoch.
    pub step: usize,
    /// Panic instead of returning an error.
    pub panic: bool,
}

/// What every replica needs to build itself.
#[derive(Clone)]
struct ReplicaSetup {
    training: TrainingSpec,
    lr_decay: LrDecay,
    backbone: Backbone,
    classes: i64,
    cancel: Option<Arc<AtomicBool>>,
    fe_epochs: u32,
    resume: Option<Arc<Mutex<TrainingState>>>,
}

/// The dataset's tensors on one device (replicas on the same device share them).
struct DeviceData {
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
}

impl DeviceData {
    fn shallow_clone(&self) -> DeviceData {
        DeviceData {
            train_x: self.train_x.shallow_clone(),
            train_y: self.train_y.shallow_clone(),
            val_x: self.val_x.shallow_clone(),
            val_y: self.val_y.shallow_clone(),
        }
    }
}

/// The work of one epoch, the same for every replica.
#[derive(Debug, Clone, Copy)]
struct EpochPlan {
    epoch: u32,
    start_fine_tuning: bool,
    mode: ForwardMode,
    /// The augmentation of this epoch's training batches.
    augment: Augment,
    /// Train the head on cached backbone features ([`FeatureCache`]).
    cache_features: bool,
    fault: Option<Fault>,
    /// Tests: the replica whose next feature cache goes wrong, and how.
    cache_fault: Option<(usize, CacheFault)>,
}

/// The frozen backbone's outputs ([`Model::features`]) for one feature-extraction phase, on
/// the replica's device: every training sample's, and the replica's part of validation; see
/// the module documentation.
struct FeatureCache {
    /// The forward mode of the training features.
    mode: ForwardMode,
    /// The batch size the training features were computed in: only batches of this size read
    /// them.
    batch: usize,
    /// Row `i`: training sample `i`.
    train: Tensor,
    /// This replica's validation part in order, computed in [`Replica::validate`]'s batches.
    val: Tensor,
}

/// What the feature cache did in a trial (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeatureCacheStats {
    /// Caches built (one per feature-extraction phase, or after a change of forward mode).
    pub builds: u32,
    /// Training batches whose features were read from the cache.
    pub train_batches_read: u64,
    /// Training batches of a cached pass computed afresh (their size is not the cache's).
    pub train_batches_computed: u64,
    /// Validation batches whose features were read from the cache.
    pub val_batches_read: u64,
    /// Caches given up for the rest of the phase: building failed, or the check batch —
    /// computed afresh and compared with the cache — differed.
    pub abandoned: u32,
}

/// What a step's forward pass starts from.
enum Input {
    /// A normalised image batch.
    Images(Tensor),
    /// [`Model::features`] of the batch, from the cache.
    Features(Tensor),
}

/// Why a replica stopped.
#[derive(Debug, Clone)]
enum ReplicaError {
    /// Its own failure, or the trial was cancelled.
    Train(TrainError),
    /// Its group was aborted because another replica stopped.
    Aborted(String),
}

impl From<TrainError> for ReplicaError {
    fn from(e: TrainError) -> Self {
        ReplicaError::Train(e)
    }
}

impl ReplicaError {
    fn into_train(self) -> TrainError {
        match self {
            ReplicaError::Train(e) => e,
            ReplicaError::Aborted(r) => TrainError::retryable(format!("data-parallel training stopped: {r}")),
        }
    }
}

/// A collective's error, in the words of `context`.
fn dist_error(context: &str) -> impl FnOnce(DistError) -> ReplicaError + '_ {
    move |e| match e {
        DistError::Aborted(r) => ReplicaError::Aborted(r),
        DistError::Torch(t) => ReplicaError::Train(TrainError::from_torch(context, TchError::Torch(t))),
        other => ReplicaError::Train(TrainError::retryable(format!("{context}: {other}"))),
    }
}

/// Loss and accuracy of a pass.
type PassMetrics = (f64, f64);

/// An unusable resume point: the daemon starts the trial over instead.
fn bad_state(message: String) -> ReplicaError {
    ReplicaError::Train(TrainError::resume_point(message))
}

/// Copies a resume point's state dict into `model`: every tensor, same names and shapes.
fn restore_model(model: &Model, state: &TrainingState) -> Result<(), ReplicaError> {
    let saved: HashMap<&str, &Tensor> = state.model.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let own = model.state_dict();
    if own.len() != saved.len() {
        return Err(bad_state(format!("{} tensors, the model has {}", saved.len(), own.len())));
    }
    tch::no_grad(|| {
        for (name, mut t) in own {
            let src = saved.get(name.as_str()).ok_or_else(|| bad_state(format!("no tensor `{name}`")))?;
            if src.size() != t.size() {
                return Err(bad_state(format!("`{name}` has shape {:?}, the model {:?}", src.size(), t.size())));
            }
            t.f_copy_(src).map_err(|e| bad_state(format!("`{name}`: {e}")))?;
        }
        Ok(())
    })
}

/// Restores the optimizer state of every parameter the resume point has one for; a saved state
/// for a parameter this optimizer does not train is an error (the phases disagree).
fn restore_optimizer(optimizer: &mut Adam, state: &TrainingState) -> Result<(), ReplicaError> {
    let mut used = 0;
    for i in 0..optimizer.params().len() {
        let name = optimizer.params()[i].name.clone();
        let Some(e) = state.optimizer.get(&name) else { continue };
        // Checks the shapes, and copies the moments to the parameter's device.
        optimizer.restore_state(i, e.step, &e.exp_avg, &e.exp_avg_sq).map_err(|x| match x {
            TchError::Shape(m) => bad_state(m),
            other => bad_state(format!("`{name}`: {other}")),
        })?;
        used += 1;
    }
    if used != state.optimizer.len() {
        return Err(bad_state(format!(
            "optimizer state for {} parameters, {} of them trained in this phase",
            state.optimizer.len(),
            used
        )));
    }
    Ok(())
}

/// One replica of the model: its optimizer, its copy of the data, and its rank's handle on the
/// group (none when training alone).
struct Replica {
    rank: usize,
    setup: ReplicaSetup,
    model: Model,
    optimizer: Adam,
    /// The optimised parameters (handles sharing the model's storage): those whose gradients
    /// are summed over the replicas.
    trained: Vec<Tensor>,
    data: DeviceData,
    comm: Option<Box<dyn AllReduce>>,
    /// Feature extraction: the backbone is frozen and runs without autograd.
    backbone_frozen: bool,
    fe_cache: Option<FeatureCache>,
    /// Set when the cache was given up: the rest of the phase runs the backbone every epoch.
    fe_cache_abandoned: bool,
    fe_stats: FeatureCacheStats,
    /// Tests: what goes wrong with the next cache.
    fe_cache_fault: Option<CacheFault>,
}

/// A fault injected into the next feature cache (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheFault {
    /// Spoilt right after it is built, before its check.
    Spoil,
    /// Building it fails (as running out of memory would).
    FailBuild,
    /// Building it stops as cancellation stops it, on this replica alone.
    CancelBuild,
}

impl Replica {
    /// Builds the model on `device`; rank 0 loads `weights`; then rank 0's parameters and
    /// buffers are broadcast to every replica; then the feature-extraction optimizer.
    fn new(
        rank: usize,
        setup: ReplicaSetup,
        device: Device,
        data: DeviceData,
        mut comm: Option<Box<dyn AllReduce>>,
        weights: Option<&Path>,
    ) -> Result<Replica, ReplicaError> {
        let model = Model::build_seeded(setup.backbone, setup.classes, device, setup.training.seed)
            .map_err(TrainError::from)?;
        if let Some(state) = &setup.resume {
            restore_model(&model, &state.lock().unwrap_or_else(|p| p.into_inner()))?;
        } else if let Some(path) = weights {
            let loaded = model.load_weights(path).map_err(TrainError::from)?;
            tracing::info!(file = %path.display(), tensors = loaded.loaded, "loaded weights");
        }
        if let Some(c) = comm.as_deref_mut() {
            let state: Vec<Tensor> = model.state_dict().into_iter().map(|(_, t)| t).collect();
            broadcast_tensors(c, &state, 0, BUCKET_BYTES).map_err(dist_error("copying the model to every replica"))?;
        }
        // Feature extraction: only the new head trains.
        model.set_trainable(|n| model.is_head(n)).map_err(torch("freezing the backbone"))?;
        let head: Vec<_> = model
            .named_parameters()
            .iter()
            .filter(|(n, _)| model.is_head(n))
            .map(|(n, t)| (n.clone(), t.shallow_clone(), setup.training.feature_extraction_lr))
            .collect();
        let optimizer =
            Adam::for_device(head, AdamConfig { weight_decay: setup.training.weight_decay, ..AdamConfig::default() })
                .map_err(torch("the feature-extraction optimizer"))?;
        let trained = optimizer.params().iter().map(|p| p.tensor.shallow_clone()).collect();
        let mut replica = Replica {
            rank,
            setup,
            model,
            optimizer,
            trained,
            data,
            comm,
            backbone_frozen: true,
            fe_cache: None,
            fe_cache_abandoned: false,
            fe_stats: FeatureCacheStats::default(),
            fe_cache_fault: None,
        };
        if let Some(shared) = replica.setup.resume.clone() {
            let state = shared.lock().unwrap_or_else(|p| p.into_inner());
            // The optimizer of the phase the state was taken in (at the end of feature
            // extraction the next epoch starts fine-tuning with a fresh one anyway).
            if state.epochs_done > replica.setup.fe_epochs {
                replica.start_fine_tuning()?;
            }
            restore_optimizer(&mut replica.optimizer, &state)?;
        }
        Ok(replica)
    }

    /// This replica's model and optimizer state, on the CPU.
    fn training_state(&self, epochs_done: u32) -> Result<TrainingState, TchError> {
        let model = self
            .model
            .state_dict()
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_to_device(Device::Cpu)?.f_contiguous()?)))
            .collect::<Result<Vec<_>, TchError>>()?;
        let mut optimizer = HashMap::new();
        for p in self.optimizer.params() {
            if let Some(st) = &p.state {
                optimizer.insert(
                    p.name.clone(),
                    OptimizerEntry {
                        step: st.step,
                        exp_avg: st.exp_avg.f_to_device(Device::Cpu)?.f_contiguous()?,
                        exp_avg_sq: st.exp_avg_sq.f_to_device(Device::Cpu)?.f_contiguous()?,
                    },
                );
            }
        }
        Ok(TrainingState { epochs_done, model, optimizer })
    }

    fn world(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.world_size())
    }

    /// Switches to fine-tuning: every parameter trains, with a new Adam whose learning rates
    /// come from the trial's decay strategy.
    fn start_fine_tuning(&mut self) -> Result<(), TrainError> {
        self.fe_cache = None;
        self.backbone_frozen = false;
        self.model.set_trainable(|_| true).map_err(torch("unfreezing the backbone"))?;
        let lrs = fine_tuning_lrs(&self.model, &self.setup.lr_decay, self.setup.training.fine_tuning_default_lr);
        let params =
            self.model.named_parameters().iter().zip(lrs).map(|((n, t), lr)| (n.clone(), t.shallow_clone(), lr));
        self.optimizer = Adam::for_device(
            params,
            AdamConfig { weight_decay: self.setup.training.weight_decay, ..AdamConfig::default() },
        )
        .map_err(torch("the fine-tuning optimizer"))?;
        self.trained = self.optimizer.params().iter().map(|p| p.tensor.shallow_clone()).collect();
        Ok(())
    }

    /// Rank 0 draws dropout masks from the single-replica stream; the others from streams of
    /// their own, so that replicas do not drop the same units of different samples.
    fn dropout_seed(&self) -> u64 {
        let seed = self.setup.training.seed;
        if self.rank == 0 { seed } else { Rng::derive(seed, &[STREAM_REPLICA, self.rank as u64]).next_u64() }
    }

    fn check_cancel(&self) -> Result<(), TrainError> {
        if cancelled(&self.setup.cancel) { Err(TrainError::Cancelled) } else { Ok(()) }
    }

    fn run_epoch(&mut self, plan: &EpochPlan) -> Result<(PassMetrics, PassMetrics), ReplicaError> {
        if let Some((rank, fault)) = plan.cache_fault
            && rank == self.rank
        {
            self.fe_cache_fault = Some(fault);
        }
        if plan.start_fine_tuning {
            self.start_fine_tuning()?;
        }
        if !plan.cache_features || self.fe_cache.as_ref().is_some_and(|c| c.mode != plan.mode) {
            self.fe_cache = None;
        }
        let cached = if plan.cache_features && !self.fe_cache_abandoned { self.train_pass_cached(plan)? } else { None };
        let train = match cached {
            Some(metrics) => metrics,
            None => self.train_pass(plan)?,
        };
        if let Some(c) = self.comm.as_deref_mut() {
            // BatchNorm statistics moved on each replica: everyone continues from rank 0's.
            let buffers: Vec<Tensor> = self.model.named_buffers().iter().map(|(_, t)| t.shallow_clone()).collect();
            broadcast_tensors(c, &buffers, 0, BUCKET_BYTES).map_err(dist_error("copying BatchNorm statistics"))?;
        }
        let val = self.validate()?;
        Ok((train, val))
    }

    /// The logits of `input`. While the backbone is frozen it runs without autograd, so only
    /// the head records a graph.
    fn logits(model: &Model, backbone_frozen: bool, input: &Input, mode: ForwardMode) -> Result<Tensor, TchError> {
        match input {
            Input::Features(f) => model.classify(f, mode),
            Input::Images(x) if backbone_frozen => {
                let features = tch::no_grad(|| model.features(x, mode))?;
                model.classify(&features, mode)
            }
            Input::Images(x) => model.forward(x, mode),
        }
    }

    /// One training step alone (one replica): the batch's mean loss.
    fn step_alone(
        &mut self,
        input: Input,
        y: Tensor,
        len: usize,
        mode: ForwardMode,
        loss_sum: &Tensor,
        correct: &Tensor,
    ) -> Result<(Tensor, Tensor), TchError> {
        let logits = Self::logits(&self.model, self.backbone_frozen, &input, mode)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)?;
        self.optimizer.zero_grad();
        loss.f_backward()?;
        self.optimizer.step()?;
        tch::no_grad(|| {
            let b = len as f64;
            let loss_sum = loss_sum.f_add(&loss.f_detach()?.f_to_kind(Kind::Double)?.f_mul_scalar(b)?)?;
            let hits = logits.f_argmax(1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?;
            Ok((loss_sum, correct.f_add(&hits)?))
        })
    }

    /// One data-parallel training step on this replica's shard (`None`: its part of a short
    /// global batch is empty): rank 0's BatchNorm buffers first (when BatchNorm trains), then
    /// the shard's summed loss divided by the *global* batch size, so that the gradients summed
    /// over the replicas are exactly those of the global batch's mean loss; then this
    /// replica's Adam step on the summed gradients.
    #[allow(clippy::too_many_arguments)]
    fn step_shared(
        &mut self,
        shard: Option<(Input, Tensor)>,
        global_len: usize,
        mode: ForwardMode,
        buffers: &[Tensor],
        loss_sum: &Tensor,
        correct: &Tensor,
        context: &str,
    ) -> Result<(Tensor, Tensor), ReplicaError> {
        let torch_err = |e: TchError| ReplicaError::Train(TrainError::from_torch(context, e));
        let Some(comm) = self.comm.as_deref_mut() else {
            return Err(ReplicaError::Train(TrainError::retryable(format!("{context}: no group"))));
        };
        if mode.bn_train {
            broadcast_tensors(comm, buffers, 0, BUCKET_BYTES).map_err(dist_error(context))?;
        }
        self.optimizer.zero_grad();
        let mut done = None;
        if let Some((input, y)) = shard {
            let logits = Self::logits(&self.model, self.backbone_frozen, &input, mode).map_err(torch_err)?;
            let sum = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0).map_err(torch_err)?;
            sum.f_mul_scalar(1.0 / global_len as f64).and_then(|l| l.f_backward()).map_err(torch_err)?;
            done = Some((sum, logits, y));
        }
        all_reduce_gradients(comm, &self.trained, BUCKET_BYTES).map_err(dist_error(context))?;
        self.optimizer.step().map_err(torch_err)?;
        let Some((sum, logits, y)) = done else {
            return Ok((loss_sum.shallow_clone(), correct.shallow_clone()));
        };
        tch::no_grad(|| -> Result<(Tensor, Tensor), TchError> {
            let loss_sum = loss_sum.f_add(&sum.f_detach()?.f_to_kind(Kind::Double)?)?;
            let hits = logits.f_argmax(1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?;
            Ok((loss_sum, correct.f_add(&hits)?))
        })
        .map_err(torch_err)
    }

    /// Whether `ok` holds on every replica (the same answer on every rank): what each decides
    /// alone about the feature cache, made a decision of the group.
    fn all_agree(&mut self, ok: bool, context: &str) -> Result<bool, ReplicaError> {
        let Some(comm) = self.comm.as_deref_mut() else { return Ok(ok) };
        let torch_err = |e: TchError| ReplicaError::Train(TrainError::from_torch(context, e));
        let mut failed = Tensor::f_from_slice(&[f64::from(u8::from(!ok))])
            .and_then(|t| t.f_to_device(comm.device()))
            .map_err(torch_err)?;
        comm.all_reduce_sum(&mut failed).map_err(dist_error(context))?;
        Ok(failed.f_double_value(&[0]).map_err(torch_err)? == 0.0)
    }

    /// This replica's part of each global batch of an epoch in `order`: the batches of
    /// `training.batch_size` × replicas, each cut into the replicas' parts ([`shard_ranges`]).
    fn shards(&self, order: &[i64]) -> Vec<Shard> {
        let world = self.world();
        let global = self.setup.training.batch_size as usize * world;
        batches(order, global)
            .into_iter()
            .map(|b| Shard { global: b.to_vec(), part: shard_ranges(b.len(), world)[self.rank].clone() })
            .collect()
    }

    /// Loss and hit sums of every replica added up (the same on every rank); alone, this
    /// replica's.
    fn global_sums(&mut self, loss_sum: &Tensor, correct: &Tensor, context: &str) -> Result<(f64, f64), ReplicaError> {
        let torch_err = |e: TchError| ReplicaError::Train(TrainError::from_torch(context, e));
        let mut totals = correct
            .f_to_kind(Kind::Double)
            .and_then(|c| Tensor::f_stack(&[loss_sum.shallow_clone(), c], 0))
            .map_err(torch_err)?;
        if let Some(c) = self.comm.as_deref_mut() {
            c.all_reduce_sum(&mut totals).map_err(dist_error(context))?;
        }
        let loss = totals.f_double_value(&[0]).map_err(torch_err)?;
        let hits = totals.f_double_value(&[1]).map_err(torch_err)?;
        Ok((loss, hits))
    }

    fn train_pass(&mut self, plan: &EpochPlan) -> Result<PassMetrics, ReplicaError> {
        let epoch = plan.epoch;
        let seed = self.setup.training.seed;
        let n = self.data.train_y.size()[0] as usize;
        let order = Rng::derive(seed, &[STREAM_SHUFFLE, epoch as u64]).permutation(n);
        let aug_rng = Rng::derive(seed, &[STREAM_AUGMENT, epoch as u64]);
        self.model.set_dropout_seed(self.dropout_seed(), epoch as u64);
        let mode = plan.mode;
        let device = self.model.device();
        // Batches are gathered and augmented ahead of the model (data::prefetch); the producer
        // draws from `aug_rng` in batch order, so the batches do not depend on its timing.
        // With several replicas each global batch is `world` per-replica batches, and each
        // replica gets its part of it.
        let shards = self.shards(&order);
        let producer = TrainBatches::sharded(
            &self.data.train_x,
            &self.data.train_y,
            shards,
            plan.augment,
            aug_rng,
            prefetch::prefetch_depth(),
        );
        let buffers: Vec<Tensor> = self.model.named_buffers().iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device)).map_err(torch("training"))?;
        let mut correct = Tensor::f_zeros([], (Kind::Int64, device)).map_err(torch("training"))?;
        let context = format!("training epoch {epoch}");
        for (step, batch) in producer.enumerate() {
            self.check_cancel()?;
            self.injected_fault(plan, step)?;
            let batch = batch.map_err(|e| TrainError::from_torch(&context, e))?;
            (loss_sum, correct) = if self.comm.is_none() {
                let (len, y) = (batch.len, batch.labels);
                self.step_alone(Input::Images(batch.images), y, len, mode, &loss_sum, &correct)
                    .map_err(|e| TrainError::from_torch(&context, e))?
            } else {
                let shard = (batch.len > 0).then(|| (Input::Images(batch.images), batch.labels));
                self.step_shared(shard, batch.global_len, mode, &buffers, &loss_sum, &correct, &context)?
            };
        }
        let (loss, hits) = self.global_sums(&loss_sum, &correct, &context)?;
        Ok((loss / n as f64, hits / n as f64))
    }

    /// The fault a test injected before `step`, if any.
    fn injected_fault(&self, plan: &EpochPlan, step: usize) -> Result<(), ReplicaError> {
        if let Some(f) = plan.fault
            && f.rank == self.rank
            && f.step == step
        {
            if f.panic {
                panic!("injected panic in replica {} before step {step}", self.rank);
            }
            return Err(ReplicaError::Train(TrainError::retryable(format!(
                "injected fault in replica {} before step {step}",
                self.rank
            ))));
        }
        Ok(())
    }

    /// The frozen backbone's features in `mode` of this replica's part of the training set
    /// (all of it alone, the `rank`-th of [`split_evenly`] with several replicas), in batches
    /// of exactly `batch` samples taken from the whole set (the last batch overlaps the one
    /// before it rather than being short), written into rows of a tensor of one row per
    /// training sample allocated once (the other replicas' rows are left for
    /// [`Replica::gather_features`]); and of the validation part in [`Replica::validate`]'s
    /// batches. `None` when cancelled.
    fn build_feature_cache(&self, mode: ForwardMode, batch: usize) -> Result<Option<FeatureCache>, TchError> {
        tch::no_grad(|| {
            let (x, n) = (&self.data.train_x, self.data.train_y.size()[0]);
            let s = batch as i64;
            let part = split_evenly(n as usize, self.world())[self.rank].clone();
            let (mut start, end) = (part.start as i64, part.end as i64);
            let mut train: Option<Tensor> = None;
            // A replica without a part still computes one batch, for the features' shape.
            let mut shape_only = start == end;
            while start < end || shape_only {
                if cancelled(&self.setup.cancel) {
                    return Ok(None);
                }
                let from = start.min(n - s);
                let images = augment::eval_batch(&x.f_narrow(0, from, s)?)?;
                let f = self.model.features(&images, mode)?;
                let all = match &mut train {
                    Some(t) => t,
                    None => train.insert(Tensor::f_empty([n, f.size()[1]], (f.kind(), f.device()))?),
                };
                if shape_only {
                    shape_only = false;
                    continue;
                }
                let rows = (from + s).min(end) - start;
                all.f_narrow(0, start, rows)?.f_copy_(&f.f_narrow(0, start - from, rows)?)?;
                start = from + s;
            }
            let Some(train) = train else { return Ok(None) };
            let batches = self.validation_batches();
            let rows: i64 = batches.iter().map(|(_, len)| len).sum();
            let val = Tensor::f_empty([rows, train.size()[1]], (train.kind(), train.device()))?;
            let mut offset = 0;
            for (start, len) in batches {
                if cancelled(&self.setup.cancel) {
                    return Ok(None);
                }
                let images = augment::eval_batch(&self.data.val_x.f_narrow(0, start, len)?)?;
                let f = self.model.features(&images, ForwardMode::EVAL)?;
                val.f_narrow(0, offset, len)?.f_copy_(&f)?;
                offset += len;
            }
            Ok(Some(FeatureCache { mode, batch, train, val }))
        })
    }

    /// With several replicas, every replica's part of the training features
    /// ([`Replica::build_feature_cache`]) copied to all (one broadcast per part): each then
    /// holds every row, whichever replica a later epoch hands a sample to.
    fn gather_features(&mut self, train: &Tensor) -> Result<(), ReplicaError> {
        let Some(comm) = self.comm.as_deref_mut() else { return Ok(()) };
        let n = train.size()[0] as usize;
        for (root, part) in split_evenly(n, comm.world_size()).into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            let mut rows = train
                .f_narrow(0, part.start as i64, part.len() as i64)
                .map_err(|e| TrainError::from_torch("gathering the feature cache", e))?;
            tch::no_grad(|| comm.broadcast(&mut rows, root)).map_err(dist_error("gathering the feature cache"))?;
        }
        Ok(())
    }

    /// Gives the cache up for the rest of the phase.
    fn abandon_feature_cache(&mut self, why: &str) {
        tracing::warn!(
            rank = self.rank,
            reason = why,
            "feature cache given up: the backbone runs every epoch of this phase"
        );
        self.fe_cache = None;
        self.fe_cache_abandoned = true;
        self.fe_stats.abandoned += 1;
        if self.rank == 0 {
            crate::metrics::global().feature_caches_abandoned.inc();
        }
    }

    /// A training pass of the head on cached features (feature extraction with a pure
    /// backbone): the same steps, on the same samples in the same order, as
    /// [`Replica::train_pass`] with no augmentation; a shard whose size differs from the
    /// cache's runs the backbone afresh. The cache's batch size is the part size that covers
    /// the most samples of an epoch ([`batching::feature_cache_batch`]; every epoch has the
    /// same sizes).
    ///
    /// Builds the cache first if needed — with several replicas each computes its part and
    /// the parts are gathered — and then checks it: each replica's first part of the cache's
    /// size this epoch is computed afresh and must equal the cached rows bit for bit (a device
    /// whose kernels do not treat samples independently, or a replica whose device computes
    /// other bits than the one that cached a row, fails here). Building and the check are
    /// decided by the whole group: if either fails on any replica, every replica gives the
    /// cache up. `None` then: the caller runs the uncached pass.
    fn train_pass_cached(&mut self, plan: &EpochPlan) -> Result<Option<PassMetrics>, ReplicaError> {
        let epoch = plan.epoch;
        let seed = self.setup.training.seed;
        let n = self.data.train_y.size()[0] as usize;
        let order = Rng::derive(seed, &[STREAM_SHUFFLE, epoch as u64]).permutation(n);
        let device = self.model.device();
        let shards = self.shards(&order);
        let Some(cache) = batching::feature_cache_batch(n, self.setup.training.batch_size as usize, self.world())
        else {
            return Ok(None);
        };
        let batch_size = cache.size;
        if self.fe_cache.is_none() && !self.build_and_check(plan.mode, batch_size, &shards)? {
            return Ok(None);
        }
        self.model.set_dropout_seed(self.dropout_seed(), epoch as u64);
        let mode = plan.mode;
        let buffers: Vec<Tensor> = self.model.named_buffers().iter().map(|(_, t)| t.shallow_clone()).collect();
        let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device)).map_err(torch("training"))?;
        let mut correct = Tensor::f_zeros([], (Kind::Int64, device)).map_err(torch("training"))?;
        let context = format!("training epoch {epoch}");
        let torch_err = |e: TchError| ReplicaError::Train(TrainError::from_torch(&context, e));
        for (step, shard) in shards.iter().enumerate() {
            self.check_cancel()?;
            self.injected_fault(plan, step)?;
            let idx = &shard.global[shard.part.clone()];
            let input = (!idx.is_empty())
                .then(|| {
                    tch::no_grad(|| -> Result<(Input, Tensor), TchError> {
                        let t = Tensor::f_from_slice(idx)?.f_to_device(device)?;
                        let y = self.data.train_y.f_index_select(0, &t)?;
                        let cache = self.fe_cache.as_ref().filter(|c| c.batch == idx.len());
                        let input = match cache {
                            Some(c) => Input::Features(c.train.f_index_select(0, &t)?),
                            None => Input::Images(augment::eval_batch(&self.data.train_x.f_index_select(0, &t)?)?),
                        };
                        Ok((input, y))
                    })
                })
                .transpose()
                .map_err(torch_err)?;
            // Counted once the step went through.
            let from_cache = input.as_ref().map(|(i, _)| matches!(i, Input::Features(_)));
            (loss_sum, correct) = match input {
                Some((input, y)) if self.comm.is_none() => {
                    self.step_alone(input, y, idx.len(), mode, &loss_sum, &correct).map_err(torch_err)?
                }
                shard_input => {
                    self.step_shared(shard_input, shard.global.len(), mode, &buffers, &loss_sum, &correct, &context)?
                }
            };
            let counters = crate::metrics::global();
            match from_cache {
                Some(true) => {
                    self.fe_stats.train_batches_read += 1;
                    counters.feature_cache_batches_read.inc();
                }
                Some(false) => {
                    self.fe_stats.train_batches_computed += 1;
                    counters.feature_cache_batches_computed.inc();
                }
                None => {}
            }
        }
        let (loss, hits) = self.global_sums(&loss_sum, &correct, &context)?;
        Ok(Some((loss / n as f64, hits / n as f64)))
    }

    /// Builds the feature cache in batches of `batch_size` and checks it against this
    /// replica's first shard of that size among `shards` (see [`Replica::train_pass_cached`]);
    /// whether the group keeps it.
    fn build_and_check(
        &mut self,
        mode: ForwardMode,
        batch_size: usize,
        shards: &[Shard],
    ) -> Result<bool, ReplicaError> {
        let device = self.model.device();
        let built = match self.fe_cache_fault.take_if(|f| *f != CacheFault::Spoil) {
            Some(CacheFault::FailBuild) => {
                Err(TchError::Torch("injected fault: out of memory while building the feature cache".into()))
            }
            Some(_) => Ok(None),
            None => self.build_feature_cache(mode, batch_size),
        };
        let built = match built {
            Ok(Some(cache)) => Ok(cache),
            Ok(None) => return Err(ReplicaError::Train(TrainError::Cancelled)),
            Err(e) => Err(format!("computing the features: {e}")),
        };
        if !self.all_agree(built.is_ok(), "building the feature cache")? {
            let why =
                built.err().unwrap_or_else(|| "another replica could not compute its part of the features".into());
            self.abandon_feature_cache(&why);
            return Ok(false);
        }
        let Ok(cache) = built else { return Ok(false) };
        self.gather_features(&cache.train)?;
        self.fe_cache = Some(cache);
        self.fe_stats.builds += 1;
        if self.fe_cache_fault.take_if(|f| *f == CacheFault::Spoil).is_some()
            && let Some(c) = &mut self.fe_cache
        {
            let _ = tch::no_grad(|| c.train.f_add_scalar_(1e-3));
        }
        let check = shards.iter().map(|sh| &sh.global[sh.part.clone()]).find(|idx| idx.len() == batch_size).map(
            |idx| -> Result<bool, TchError> {
                tch::no_grad(|| {
                    let t = Tensor::f_from_slice(idx)?.f_to_device(device)?;
                    let images = augment::eval_batch(&self.data.train_x.f_index_select(0, &t)?)?;
                    let fresh = self.model.features(&images, mode)?;
                    let cached = self.fe_cache.as_ref().map(|c| c.train.f_index_select(0, &t)).transpose()?;
                    Ok(cached.is_some_and(|c| c.equal(&fresh)))
                })
            },
        );
        let own = match check {
            Some(Ok(true)) | None => None,
            Some(Ok(false)) => Some("a batch computed afresh differs from its cached features".to_string()),
            Some(Err(e)) => Some(format!("checking the features: {e}")),
        };
        if !self.all_agree(own.is_none(), "checking the feature cache")? {
            let why = own.unwrap_or_else(|| {
                "on another replica a batch computed afresh differs from its cached features".into()
            });
            self.abandon_feature_cache(&why);
            return Ok(false);
        }
        if self.rank == 0 {
            crate::metrics::global().feature_caches_built.inc();
        }
        if let Some(c) = &self.fe_cache {
            let bytes = (c.train.numel() + c.val.numel()) * c.train.kind().elt_size_in_bytes();
            tracing::info!(
                rank = self.rank,
                train = c.train.size()[0],
                val = c.val.size()[0],
                features = c.train.size().get(1).copied().unwrap_or(0),
                megabytes = bytes as f64 / 1e6,
                "feature cache built: the frozen backbone runs once per image for this phase"
            );
        }
        Ok(true)
    }

    /// `(start, len)` of each validation batch of this replica's part.
    fn validation_batches(&self) -> Vec<(i64, i64)> {
        let n = self.data.val_y.size()[0] as usize;
        let part = split_evenly(n, self.world())[self.rank].clone();
        let batch_size = self.setup.training.batch_size.max(1) as usize;
        (part.start..part.end).step_by(batch_size).map(|s| (s as i64, (batch_size.min(part.end - s)) as i64)).collect()
    }

    /// Validation in evaluation mode; with several replicas each takes a contiguous part of
    /// the validation set and the sums are added up, so every sample counts once.
    fn validate(&mut self) -> Result<PassMetrics, ReplicaError> {
        let n = self.data.val_y.size()[0] as usize;
        let device = self.model.device();
        let (model, data, cancel) = (&self.model, &self.data, &self.setup.cancel);
        let (batches, cache) = (self.validation_batches(), self.fe_cache.as_ref());
        let read = if cache.is_some() { batches.len() as u64 } else { 0 };
        let (loss_sum, correct) = tch::no_grad(|| {
            let run = || -> Result<(Tensor, Tensor), TchError> {
                let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device))?;
                let mut correct = Tensor::f_zeros([], (Kind::Int64, device))?;
                let mut offset = 0;
                for &(start, len) in &batches {
                    if cancelled(cancel) {
                        break;
                    }
                    let y = data.val_y.f_narrow(0, start, len)?;
                    let logits = match cache {
                        Some(c) => model.classify(&c.val.f_narrow(0, offset, len)?, ForwardMode::EVAL)?,
                        None => model
                            .forward(&augment::eval_batch(&data.val_x.f_narrow(0, start, len)?)?, ForwardMode::EVAL)?,
                    };
                    offset += len;
                    let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
                    loss_sum = loss_sum.f_add(&loss.f_to_kind(Kind::Double)?)?;
                    correct = correct.f_add(&logits.f_argmax(1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?)?;
                }
                Ok((loss_sum, correct))
            };
            run().map_err(torch("validation"))
        })?;
        self.fe_stats.val_batches_read += read;
        let (loss, hits) = self.global_sums(&loss_sum, &correct, "validation")?;
        self.check_cancel()?;
        Ok((loss / n as f64, hits / n as f64))
    }
}

/// What the trainer asks a replica thread to do.
#[derive(Debug, Clone, Copy)]
enum Command {
    Epoch(EpochPlan),
    Validate,
    CacheStats,
}

/// What a replica thread answers.
enum Reply {
    /// Built and synchronised with rank 0.
    Ready,
    Epoch((PassMetrics, PassMetrics)),
    Validated(PassMetrics),
    CacheStats(FeatureCacheStats),
}

/// A replica (rank ≥ 1) on its own thread.
struct Peer {
    rank: usize,
    /// Closed to make the thread end.
    commands: Option<mpsc::Sender<Command>>,
    replies: mpsc::Receiver<Result<Reply, ReplicaError>>,
    handle: Option<JoinHandle<()>>,
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Runs a replica's work; a failure (an error or a panic, not an abort caused by another
/// replica) aborts the group so that no replica waits for this one.
fn guarded<T>(
    rank: usize,
    abort: &AbortHandle,
    f: impl FnOnce() -> Result<T, ReplicaError>,
) -> Result<T, ReplicaError> {
    let result = match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => Err(ReplicaError::Train(TrainError::retryable(format!(
            "replica {rank} panicked: {}",
            panic_message(panic.as_ref())
        )))),
    };
    if let Err(ReplicaError::Train(e)) = &result {
        abort.abort(&format!("replica {rank} stopped: {e}"));
    }
    result
}

impl Peer {
    fn spawn(
        rank: usize,
        setup: ReplicaSetup,
        device: Device,
        data: DeviceData,
        comm: Box<dyn AllReduce>,
        abort: AbortHandle,
    ) -> std::io::Result<Peer> {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (outbox, replies) = mpsc::channel::<Result<Reply, ReplicaError>>();
        let handle = std::thread::Builder::new().name(format!("sweep-replica-{rank}")).spawn(move || {
            let built = guarded(rank, &abort, move || Replica::new(rank, setup, device, data, Some(comm), None));
            let mut replica = match built {
                Ok(r) => r,
                Err(e) => {
                    let _ = outbox.send(Err(e));
                    return;
                }
            };
            if outbox.send(Ok(Reply::Ready)).is_err() {
                return;
            }
            for command in inbox {
                let reply = guarded(rank, &abort, || match command {
                    Command::Epoch(plan) => replica.run_epoch(&plan).map(Reply::Epoch),
                    Command::Validate => replica.validate().map(Reply::Validated),
                    Command::CacheStats => Ok(Reply::CacheStats(replica.fe_stats)),
                });
                if outbox.send(reply).is_err() {
                    break;
                }
            }
        })?;
        Ok(Peer { rank, commands: Some(commands), replies, handle: Some(handle) })
    }

    /// The thread's answer to the last command.
    fn reply(&self) -> Result<Reply, ReplicaError> {
        self.replies.recv().unwrap_or_else(|_| {
            Err(ReplicaError::Train(TrainError::retryable(format!("replica {} stopped unexpectedly", self.rank))))
        })
    }
}

/// Closes the peers' command channels (they leave their loops and drop their replicas),
/// drops `lead_comm` meanwhile, and joins them.
fn shut_down(peers: &mut Vec<Peer>, lead_comm: Option<Box<dyn AllReduce>>) {
    for p in peers.iter_mut() {
        p.commands.take();
    }
    drop(lead_comm);
    for p in peers.iter_mut() {
        if let Some(h) = p.handle.take() {
            let _ = h.join();
        }
    }
    peers.clear();
}

/// The outcome of one piece of work on every replica (rank order): every value, or the error
/// that explains the failure best — a replica's own error (the lowest rank's), else
/// cancellation, else the abort.
fn combine<T>(results: Vec<(usize, Result<T, ReplicaError>)>, devices: &[Device]) -> Result<Vec<T>, TrainError> {
    let mut values = Vec::with_capacity(results.len());
    let (mut own, mut cancel, mut aborted) = (None, false, None);
    for (rank, r) in results {
        match r {
            Ok(v) => values.push(v),
            Err(ReplicaError::Train(TrainError::Cancelled)) => cancel = true,
            Err(ReplicaError::Train(e)) if own.is_none() => {
                own = Some(if rank == 0 {
                    e
                } else {
                    let at = format!("replica {rank} on {}", dist::device_name(devices[rank]));
                    match e {
                        TrainError::Permanent(m) => TrainError::Permanent(m.at(&at)),
                        TrainError::Retryable(m) => TrainError::Retryable(m.at(&at)),
                        TrainError::ResumePoint(m) => TrainError::ResumePoint(m.at(&at)),
                        TrainError::Cancelled => TrainError::Cancelled,
                    }
                });
            }
            Err(ReplicaError::Train(_)) => {}
            Err(ReplicaError::Aborted(r)) => {
                aborted.get_or_insert(r);
            }
        }
    }
    if let Some(e) = own {
        return Err(e);
    }
    if cancel {
        return Err(TrainError::Cancelled);
    }
    if let Some(r) = aborted {
        return Err(ReplicaError::Aborted(r).into_train());
    }
    Ok(values)
}

/// A trial being trained, one epoch at a time. [`run_trial`] is the usual entry point; this
/// type exists for callers that need to act between epochs (checkpoints, shared stages).
///
/// **Data parallel.** With several [`TrainOptions::devices`] the trainer holds one replica per
/// device: rank 0 on the calling thread (the one [`Trainer::model`] shows and checkpoints
/// save), the others on threads of their own, each with its model, optimizer and copy of the
/// uint8 dataset on its device. At the start rank 0's parameters and buffers (after weight
/// loading) are broadcast to all. Each step's global batch — `training.batch_size` × replicas,
/// cut from the same seeded epoch order as with one replica — is split into contiguous shards
/// ([`shard_ranges`]); augmentation parameters are drawn per sample for the whole global batch,
/// so a sample is augmented the same way whatever the number of replicas. Before each step in
/// which BatchNorm trains, rank 0's buffers are broadcast (PyTorch DDP's `broadcast_buffers`).
/// Each replica divides its shard's summed loss by the global batch size, gradients are summed
/// in ~25 MB buckets ([`dist`]), and each replica steps its own Adam, so the replicas stay
/// identical and — with BatchNorm frozen and no dropout — train as one replica on the global
/// batch (up to floating-point summation order). Train and validation metrics are sums over
/// all replicas; validation is split between them. Dropout masks come from per-replica streams
/// and BatchNorm normalises each shard with its own statistics (as DDP without SyncBatchNorm),
/// so with those the result depends on the number of replicas.
///
/// If any replica fails, is cancelled or panics, the group is aborted, every replica stops at
/// its next collective, and the epoch returns the most telling error; the trainer then refuses
/// further epochs.
pub struct Trainer {
    fe_epochs: u32,
    ft_epochs: u32,
    freeze_bn_stats: bool,
    /// The feature cache may serve feature extraction: asked for (whether the epoch is
    /// unaugmented and the backbone pure in its mode is decided per epoch).
    feature_cache: bool,
    devices: Vec<Device>,
    lead: Replica,
    peers: Vec<Peer>,
    abort: Option<AbortHandle>,
    epochs_done: u32,
    /// Set when an epoch failed with several replicas (they may no longer agree).
    failed: Option<TrainError>,
    /// Work was handed to the peers and not collected yet.
    busy: bool,
    mode_override: Option<ForwardMode>,
    fault: Option<Fault>,
    cache_fault: Option<(usize, CacheFault)>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.lead.model)
            .field("devices", &self.devices)
            .field("epochs_done", &self.epochs_done)
            .field("fe_epochs", &self.fe_epochs)
            .field("ft_epochs", &self.ft_epochs)
            .finish()
    }
}

fn torch(context: &'static str) -> impl FnOnce(TchError) -> TrainError {
    move |e| TrainError::from_torch(context, e)
}

impl Trainer {
    /// Prepares trial `trial` of `spec`: dataset (from the process cache), model with a new
    /// head, weights, data on the device(s), the feature-extraction optimizer, and with
    /// several devices the replicas and their group.
    pub fn new(spec: &SweepSpec, trial: &Trial, options: &TrainOptions) -> Result<Trainer, TrainError> {
        let training = spec.training.clone();
        let backbone = trial.backbone;
        let image_size = spec.dataset.image_size();
        if image_size < backbone.min_image_size() {
            return Err(TrainError::permanent(format!(
                "dataset.image_size {image_size} px is too small for {}, which needs at least {} px",
                backbone.name(),
                backbone.min_image_size()
            )));
        }
        let devices = options.devices.clone();
        dist::backend_for(&devices).map_err(|e| TrainError::retryable(format!("training devices: {e}")))?;
        let cuda_count = devices.iter().any(|d| d.is_cuda()).then(|| tch::Cuda::device_count().max(0) as usize);
        if let Some(&Device::Cuda(missing)) =
            devices.iter().find(|d| matches!(d, Device::Cuda(i) if *i >= cuda_count.unwrap_or(0)))
        {
            return Err(TrainError::retryable(format!(
                "training devices: cuda:{missing} is not on this machine, which has {} CUDA device(s)",
                cuda_count.unwrap_or(0)
            )));
        }
        let dataset = data::load(&spec.dataset)?;
        if dataset.train.len() < 2 {
            return Err(TrainError::permanent(format!(
                "the training split has {} image(s); training with BatchNorm needs at least 2",
                dataset.train.len()
            )));
        }
        if dataset.val.is_empty() {
            return Err(TrainError::permanent("the validation split has no image"));
        }
        let total = trial.fe_epochs + trial.ft_epochs;
        let epochs_done = match options.resume.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).epochs_done)
        {
            Some(done) if done > total => {
                return Err(TrainError::resume_point(format!("{done} epochs done, the trial has {total}")));
            }
            Some(done) => done,
            None => 0,
        };
        // A resume point replaces the initial weights: they are not even looked for.
        let weights = match options.resume {
            Some(_) => None,
            None => weights_file(&spec.model.weights, backbone, options.weights_dir().as_deref())?,
        };
        let freeze_bn_stats = training.freeze_bn_stats;
        let feature_cache = options.feature_cache;
        let setup = ReplicaSetup {
            training,
            lr_decay: trial.lr_decay,
            backbone,
            classes: dataset.classes.len() as i64,
            cancel: options.cancel.clone(),
            fe_epochs: trial.fe_epochs,
            resume: options.resume.clone(),
        };
        // The dataset on each distinct device (CPU replicas share one copy).
        let mut on_device: Vec<(Device, DeviceData)> = Vec::new();
        for &d in &devices {
            if on_device.iter().any(|(x, _)| *x == d) {
                continue;
            }
            let (train_x, train_y) =
                dataset.train.to_tensors(d).map_err(torch("copying the training set to the device"))?;
            let (val_x, val_y) =
                dataset.val.to_tensors(d).map_err(torch("copying the validation set to the device"))?;
            on_device.push((d, DeviceData { train_x, train_y, val_x, val_y }));
        }
        let data_on = |d: Device| {
            on_device
                .iter()
                .find(|(x, _)| *x == d)
                .map(|(_, data)| data.shallow_clone())
                .ok_or_else(|| TrainError::retryable(format!("no data on {}", dist::device_name(d))))
        };
        let trainer = |lead: Replica, peers: Vec<Peer>, abort: Option<AbortHandle>| Trainer {
            fe_epochs: trial.fe_epochs,
            ft_epochs: trial.ft_epochs,
            freeze_bn_stats,
            feature_cache,
            devices: devices.clone(),
            lead,
            peers,
            abort,
            epochs_done,
            failed: None,
            busy: false,
            mode_override: None,
            fault: None,
            cache_fault: None,
        };
        if devices.len() == 1 {
            let lead = Replica::new(0, setup, devices[0], data_on(devices[0])?, None, weights.as_deref())
                .map_err(ReplicaError::into_train)?;
            return Ok(trainer(lead, Vec::new(), None));
        }

        let comms = dist::group(&devices).map_err(|e| {
            TrainError::retryable(format!("cannot train on {} in data parallel: {e}", dist::describe_devices(&devices)))
        })?;
        let abort = comms[0].abort_handle();
        let mut comms = comms.into_iter();
        let lead_comm = comms.next();
        let mut peers = Vec::with_capacity(devices.len() - 1);
        for (i, comm) in comms.enumerate() {
            let rank = i + 1;
            let spawned = data_on(devices[rank]).and_then(|data| {
                Peer::spawn(rank, setup.clone(), devices[rank], data, comm, abort.clone())
                    .map_err(|e| TrainError::retryable(format!("cannot start the thread of replica {rank}: {e}")))
            });
            if let Err(e) = spawned.map(|p| peers.push(p)) {
                abort.abort(&e.to_string());
                shut_down(&mut peers, lead_comm);
                return Err(e);
            }
        }
        let lead = guarded(0, &abort, || {
            Replica::new(0, setup, devices[0], data_on(devices[0])?, lead_comm, weights.as_deref())
        });
        let mut results: Vec<(usize, Result<(), ReplicaError>)> =
            vec![(0, lead.as_ref().map(|_| ()).map_err(Clone::clone))];
        for p in &peers {
            results.push((p.rank, p.reply().map(|_| ())));
        }
        match (combine(results, &devices), lead) {
            (Ok(_), Ok(lead)) => Ok(trainer(lead, peers, Some(abort))),
            (Err(e), lead) => {
                abort.abort(&e.to_string());
                shut_down(&mut peers, lead.ok().and_then(|mut l| l.comm.take()));
                Err(e)
            }
            (Ok(_), Err(e)) => {
                abort.abort("replica 0 failed");
                shut_down(&mut peers, None);
                Err(e.into_train())
            }
        }
    }

    /// Rows of the feature cache (training, validation) while feature extraction trains on
    /// it; `None` otherwise.
    pub fn cached_features(&self) -> Option<(i64, i64)> {
        self.lead.fe_cache.as_ref().map(|c| (c.train.size()[0], c.val.size()[0]))
    }

    /// What the feature cache did so far (rank 0's).
    pub fn feature_cache_stats(&self) -> FeatureCacheStats {
        self.lead.fe_stats
    }

    /// What the feature cache did so far on each replica, in rank order.
    pub fn feature_cache_stats_per_replica(&mut self) -> Result<Vec<FeatureCacheStats>, TrainError> {
        self.on_each(
            Command::CacheStats,
            |r| Ok(r.fe_stats),
            |reply| match reply {
                Reply::CacheStats(s) => Some(s),
                _ => None,
            },
        )
    }

    /// The model being trained (rank 0's replica).
    pub fn model(&self) -> &Model {
        &self.lead.model
    }

    /// The optimizer of the current phase (rank 0's).
    pub fn optimizer(&self) -> &Adam {
        &self.lead.optimizer
    }

    /// The training devices, one replica each.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Number of replicas.
    pub fn world_size(&self) -> usize {
        self.devices.len()
    }

    /// Epochs completed so far.
    pub fn epochs_done(&self) -> u32 {
        self.epochs_done
    }

    /// Feature-extraction plus fine-tuning epochs.
    pub fn total_epochs(&self) -> u32 {
        self.fe_epochs + self.ft_epochs
    }

    /// The phase of the next epoch.
    pub fn phase(&self) -> Phase {
        Phase::of_epoch(self.epochs_done + 1, self.fe_epochs)
    }

    /// Forces the forward mode of the training passes from the next epoch on (`None`: the
    /// recipe's — training mode, BatchNorm frozen during feature extraction with
    /// `freeze_bn_stats`). For experiments and tests, e.g. BatchNorm frozen in every phase
    /// (`ForwardMode::TRAIN_FROZEN_BN`); trials never set it.
    pub fn set_forward_mode_override(&mut self, mode: Option<ForwardMode>) {
        self.mode_override = mode;
    }

    /// Makes one replica fail (or panic) before a step of the next epoch, to test that the
    /// others stop. Never used by the worker.
    #[doc(hidden)]
    pub fn inject_fault(&mut self, fault: Fault) {
        self.fault = Some(fault);
    }

    /// Tests: replica `rank`'s next feature cache is spoilt right after it is built (as a
    /// device whose kernels depend on a sample's batch would spoil it), so that its check
    /// fails.
    #[doc(hidden)]
    pub fn spoil_next_feature_cache(&mut self, rank: usize) {
        assert!(rank < self.devices.len(), "no replica {rank}");
        self.cache_fault = Some((rank, CacheFault::Spoil));
    }

    /// Tests: replica `rank`'s next feature cache fails to build (as running out of memory
    /// would).
    #[doc(hidden)]
    pub fn fail_next_feature_cache_build(&mut self, rank: usize) {
        assert!(rank < self.devices.len(), "no replica {rank}");
        self.cache_fault = Some((rank, CacheFault::FailBuild));
    }

    /// Tests: replica `rank` stops building its next feature cache as if the trial were
    /// cancelled, while the others build theirs.
    #[doc(hidden)]
    pub fn cancel_next_feature_cache_build(&mut self, rank: usize) {
        assert!(rank < self.devices.len(), "no replica {rank}");
        self.cache_fault = Some((rank, CacheFault::CancelBuild));
    }

    /// Runs `lead` on rank 0 and `command` on every other replica, and collects the outcome:
    /// rank 0's value (every replica's agree).
    fn on_all<T>(
        &mut self,
        command: Command,
        lead: impl FnOnce(&mut Replica) -> Result<T, ReplicaError>,
        unpack: impl Fn(Reply) -> Option<T>,
    ) -> Result<T, TrainError> {
        self.on_each(command, lead, unpack).map(|mut values| values.swap_remove(0))
    }

    /// [`Trainer::on_all`], every replica's value in rank order.
    fn on_each<T>(
        &mut self,
        command: Command,
        lead: impl FnOnce(&mut Replica) -> Result<T, ReplicaError>,
        unpack: impl Fn(Reply) -> Option<T>,
    ) -> Result<Vec<T>, TrainError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let Some(abort) = self.abort.clone() else {
            // One replica: on this thread, nothing else.
            return lead(&mut self.lead).map(|v| vec![v]).map_err(ReplicaError::into_train);
        };
        self.busy = true;
        let sent: Vec<bool> =
            self.peers.iter().map(|p| p.commands.as_ref().is_some_and(|c| c.send(command).is_ok())).collect();
        if let Some(i) = sent.iter().position(|s| !s) {
            abort.abort(&format!("replica {} is gone", self.peers[i].rank));
        }
        let mut results = vec![(0, guarded(0, &abort, || lead(&mut self.lead)))];
        for (p, sent) in self.peers.iter().zip(sent) {
            let r = if sent {
                p.reply().and_then(|reply| {
                    unpack(reply).ok_or_else(|| {
                        ReplicaError::Train(TrainError::retryable(format!("replica {} answered out of turn", p.rank)))
                    })
                })
            } else {
                Err(ReplicaError::Train(TrainError::retryable(format!("replica {} is gone", p.rank))))
            };
            results.push((p.rank, r));
        }
        self.busy = false;
        match combine(results, &self.devices) {
            Ok(values) => Ok(values),
            Err(e) => {
                abort.abort(&e.to_string());
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The state to resume this trial from after the epochs done so far (rank 0's model and
    /// optimizer, on the CPU; every replica holds the same).
    pub fn training_state(&self) -> Result<TrainingState, TrainError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.lead.training_state(self.epochs_done).map_err(torch("copying the training state"))
    }

    /// Trains and validates the next epoch and returns its metrics.
    pub fn run_epoch(&mut self) -> Result<EpochMetrics, TrainError> {
        let epoch = self.epochs_done + 1;
        if epoch > self.total_epochs() {
            return Err(TrainError::permanent(format!("the trial has only {} epochs", self.total_epochs())));
        }
        let phase = Phase::of_epoch(epoch, self.fe_epochs);
        let mode = self.mode_override.unwrap_or(if phase == Phase::FeatureExtraction && self.freeze_bn_stats {
            ForwardMode::TRAIN_FROZEN_BN
        } else {
            ForwardMode::TRAIN
        });
        let augment = self.lead.setup.training.augment_in(phase);
        let plan = EpochPlan {
            epoch,
            start_fine_tuning: phase == Phase::FineTuning && epoch == self.fe_epochs + 1,
            mode,
            augment,
            // Built only when another feature-extraction epoch follows to use it.
            cache_features: self.feature_cache
                && phase == Phase::FeatureExtraction
                && augment.is_identity()
                && self.lead.model.features_are_pure(mode)
                && (epoch < self.fe_epochs || self.lead.fe_cache.is_some()),
            fault: self.fault.take(),
            cache_fault: self.cache_fault.take(),
        };
        let start = Instant::now();
        let ((train_loss, train_accuracy), (val_loss, val_accuracy)) = self.on_all(
            Command::Epoch(plan),
            |r| r.run_epoch(&plan),
            |reply| match reply {
                Reply::Epoch(m) => Some(m),
                _ => None,
            },
        )?;
        self.epochs_done = epoch;
        Ok(EpochMetrics {
            epoch,
            phase,
            train_loss,
            train_accuracy,
            val_loss,
            val_accuracy,
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Validation loss and accuracy of the current weights (what [`Trainer::run_epoch`]
    /// reports after training), shared between the replicas.
    pub fn validate(&mut self) -> Result<(f64, f64), TrainError> {
        self.on_all(
            Command::Validate,
            |r| r.validate(),
            |reply| match reply {
                Reply::Validated(m) => Some(m),
                _ => None,
            },
        )
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        if self.peers.is_empty() {
            return;
        }
        if self.busy
            && let Some(a) = &self.abort
        {
            // Unwinding out of an epoch: the peers may be waiting for rank 0.
            a.abort("the trainer was dropped during an epoch");
        }
        let lead_comm = self.lead.comm.take();
        shut_down(&mut self.peers, lead_comm);
    }
}

/// Runs trial `trial` of `spec` to completion: feature extraction, then fine-tuning, calling
/// `on_epoch` after every epoch. Returns the metrics of every epoch, [`TrainError::Cancelled`]
/// when `on_epoch` returns [`Control::Stop`] or the cancel flag is raised, or a classified
/// error. Never panics on bad input.
///
/// The dataset is decoded once per process and shared by later trials (see [`data::load`]).
pub fn run_trial(
    spec: &SweepSpec,
    trial: &Trial,
    options: &TrainOptions,
    on_epoch: &mut dyn FnMut(&EpochReport) -> Control,
) -> Result<TrialSummary, TrainError> {
    let mut trainer = Trainer::new(spec, trial, options)?;
    let parameters = trainer.model().parameter_count();
    let mut metrics = Vec::with_capacity(trainer.total_epochs() as usize);
    while trainer.epochs_done() < trainer.total_epochs() {
        let m = trainer.run_epoch()?;
        metrics.push(m);
        if on_epoch(&EpochReport { metrics: m, parameters }) == Control::Stop {
            return Err(TrainError::Cancelled);
        }
    }
    Ok(TrialSummary { metrics, parameters })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_merge_a_trailing_single_sample() {
        let v: Vec<i64> = (0..9).collect();
        let b = batches(&v, 4);
        assert_eq!(b, vec![&v[0..4], &v[4..9]]);
        let b = batches(&v, 3);
        assert_eq!(b.len(), 3);
        let b = batches(&v[..1], 4);
        assert_eq!(b, vec![&v[0..1]]);
        let b = batches(&v[..5], 1);
        assert_eq!(b.len(), 4);
        assert_eq!(b[3], &v[3..5]);
    }

    #[test]
    fn torch_errors_are_classified() {
        let oom = TrainError::from_torch("step", TchError::Torch("CUDA out of memory. Tried to allocate".into()));
        assert!(matches!(oom, TrainError::Retryable(_)));
        let shape = TchError::Torch(
            "mat1 and mat2 shapes cannot be multiplied\nException raised from check at x.cpp:1\nframe #0: ...".into(),
        );
        let e = TrainError::from_torch("step", shape);
        assert_eq!(e, TrainError::permanent("step: mat1 and mat2 shapes cannot be multiplied"));
    }

    #[test]
    fn a_failure_keeps_its_cause_as_a_source_and_its_class_through_context() {
        use std::error::Error;
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "the store did not answer");
        let e = TrainError::retryable_from("checkpoint", io);
        assert_eq!(e.to_string(), "checkpoint: the store did not answer");
        let cause = e.source().expect("the cause is kept");
        assert_eq!(cause.downcast_ref::<std::io::Error>().map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut));
        // Where it happened is added to the message; the class and the cause stay.
        let TrainError::Retryable(f) = e else { panic!("retryable") };
        let at = TrainError::Retryable(f.at("replica 1 on cpu:1"));
        assert_eq!(at.to_string(), "replica 1 on cpu:1: checkpoint: the store did not answer");
        assert!(at.source().is_some() && !at.is_permanent());
        let data = TrainError::from(DataError::Layout("no class folder".into()));
        assert!(data.is_permanent() && data.source().is_some(), "{data:?}");
        let resume = TrainError::resume_point("3 epochs done, the trial has 2");
        assert_eq!(resume.to_string(), "resume point: 3 epochs done, the trial has 2");
    }

    #[test]
    fn weights_files_are_resolved_with_clear_errors() {
        assert_eq!(weights_file(&Weights::None, Backbone::Resnet18, None), Ok(None));
        let e = weights_file(&Weights::ImageNet, Backbone::Resnet50, None).unwrap_err();
        assert!(e.is_permanent());
        assert!(e.to_string().contains(WEIGHTS_DIR_ENV), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = weights_file(&Weights::ImageNet, Backbone::Resnet50, Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("resnet50.safetensors"), "{e}");
        assert!(e.contains("tools/export_torchvision_weights.py"), "{e}");
        assert!(e.contains("non-commercial"), "{e}");
        std::fs::write(dir.path().join("resnet50.safetensors"), b"x").unwrap();
        let p = weights_file(&Weights::ImageNet, Backbone::Resnet50, Some(dir.path())).unwrap();
        assert_eq!(p, Some(dir.path().join("resnet50.safetensors")));
        let e = weights_file(&Weights::File("/no/such.safetensors".into()), Backbone::Resnet18, None).unwrap_err();
        assert!(e.to_string().contains("/no/such.safetensors"));
    }
}
