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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use sweep_core::leaderboard::{EpochMetrics, Phase};
use sweep_core::spec::{SweepSpec, TrainingSpec, Weights};
use sweep_core::{Backbone, LrDecay, Trial};
use tch::{Device, Kind, Reduction, TchError, Tensor};

use crate::adam::{Adam, AdamConfig};
use crate::augment;
use crate::data::prefetch::{self, Batch, TrainBatches};
use crate::data::{self, DataError};
use crate::model::{ForwardMode, Model, ModelError};
use crate::rng::{Rng, STREAM_AUGMENT, STREAM_SHUFFLE};

/// Environment variable naming the directory of `<backbone>.safetensors` ImageNet weights,
/// used when [`TrainOptions::weights_dir`] is not set.
pub const WEIGHTS_DIR_ENV: &str = "SWEEP_WEIGHTS_DIR";

/// Why a trial did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainError {
    /// Will fail again on any attempt: a bad dataset, missing or mismatched weights, a setting
    /// the backbone cannot take.
    #[error("{0}")]
    Permanent(String),
    /// Worth another attempt: out of memory, a device error.
    #[error("{0}")]
    Retryable(String),
    /// Stopped on request (the callback returned [`Control::Stop`], or the cancel flag was set).
    #[error("cancelled")]
    Cancelled,
}

impl TrainError {
    /// True for [`TrainError::Permanent`].
    pub fn is_permanent(&self) -> bool {
        matches!(self, TrainError::Permanent(_))
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
            TrainError::Retryable(message)
        } else {
            TrainError::Permanent(message)
        }
    }
}

impl From<DataError> for TrainError {
    fn from(e: DataError) -> Self {
        if e.is_permanent() {
            TrainError::Permanent(format!("dataset: {e}"))
        } else {
            TrainError::Retryable(format!("dataset: {e}"))
        }
    }
}

impl From<ModelError> for TrainError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Torch(t) => TrainError::from_torch("model", t),
            other => TrainError::Permanent(other.to_string()),
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
    /// Training device (`Device::Cpu`, `Device::Cuda(i)`).
    pub device: Device,
    /// Directory of `<backbone>.safetensors` ImageNet weights; when `None`, the
    /// [`WEIGHTS_DIR_ENV`] environment variable.
    pub weights_dir: Option<PathBuf>,
    /// Checked before every batch: when set, the trial stops with [`TrainError::Cancelled`]
    /// (how a daemon stops a trial between epoch reports).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl TrainOptions {
    /// Options for `device`, no weights directory (the environment variable applies), no
    /// cancel flag.
    pub fn new(device: Device) -> TrainOptions {
        TrainOptions { device, weights_dir: None, cancel: None }
    }

    fn weights_dir(&self) -> Option<PathBuf> {
        self.weights_dir.clone().or_else(|| std::env::var_os(WEIGHTS_DIR_ENV).map(PathBuf::from))
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed))
    }
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
                Err(TrainError::Permanent(format!(
                    "weights file {} (model.weights) does not exist on this worker",
                    path.display()
                )))
            }
        }
        Weights::ImageNet => {
            let file = format!("{}.safetensors", backbone.name());
            let Some(dir) = weights_dir else {
                return Err(TrainError::Permanent(format!(
                    "model.weights is `imagenet` but this worker has no weights directory: set {WEIGHTS_DIR_ENV} (or the worker's weights-dir option) to a directory holding {file}; {HOW}"
                )));
            };
            let path = dir.join(&file);
            if path.is_file() {
                Ok(Some(path))
            } else {
                Err(TrainError::Permanent(format!(
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
    let mut out: Vec<&[i64]> = order.chunks(batch_size.max(1)).collect();
    if out.len() >= 2 && out[out.len() - 1].len() == 1 {
        let n = order.len();
        out.pop();
        let start = n - 1 - out[out.len() - 1].len();
        let last = out.len() - 1;
        out[last] = &order[start..];
    }
    out
}

/// A trial being trained, one epoch at a time. [`run_trial`] is the usual entry point; this
/// type exists for callers that need to act between epochs (checkpoints, shared stages).
pub struct Trainer {
    training: TrainingSpec,
    lr_decay: LrDecay,
    fe_epochs: u32,
    ft_epochs: u32,
    options: TrainOptions,
    model: Model,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    optimizer: Adam,
    epochs_done: u32,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", &self.model)
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
    /// head, weights, data on the device, and the feature-extraction optimizer.
    pub fn new(spec: &SweepSpec, trial: &Trial, options: &TrainOptions) -> Result<Trainer, TrainError> {
        let training = spec.training.clone();
        let backbone = trial.backbone;
        let image_size = spec.dataset.image_size();
        if image_size < backbone.min_image_size() {
            return Err(TrainError::Permanent(format!(
                "dataset.image_size {image_size} px is too small for {}, which needs at least {} px",
                backbone.name(),
                backbone.min_image_size()
            )));
        }
        let dataset = data::load(&spec.dataset)?;
        if dataset.train.len() < 2 {
            return Err(TrainError::Permanent(format!(
                "the training split has {} image(s); training with BatchNorm needs at least 2",
                dataset.train.len()
            )));
        }
        if dataset.val.is_empty() {
            return Err(TrainError::Permanent("the validation split has no image".into()));
        }
        let model = Model::build_seeded(backbone, dataset.classes.len() as i64, options.device, training.seed)?;
        if let Some(path) = weights_file(&spec.model.weights, backbone, options.weights_dir().as_deref())? {
            let loaded = model.load_weights(&path)?;
            tracing::info!(file = %path.display(), tensors = loaded.loaded, "loaded weights");
        }
        let (train_x, train_y) =
            dataset.train.to_tensors(options.device).map_err(torch("copying the training set to the device"))?;
        let (val_x, val_y) =
            dataset.val.to_tensors(options.device).map_err(torch("copying the validation set to the device"))?;
        // Feature extraction: only the new head trains.
        model.set_trainable(|n| model.is_head(n)).map_err(torch("freezing the backbone"))?;
        let head: Vec<_> = model
            .named_parameters()
            .iter()
            .filter(|(n, _)| model.is_head(n))
            .map(|(n, t)| (n.clone(), t.shallow_clone(), training.feature_extraction_lr))
            .collect();
        let optimizer = Adam::new(head, AdamConfig { weight_decay: training.weight_decay, ..AdamConfig::default() });
        Ok(Trainer {
            training,
            lr_decay: trial.lr_decay,
            fe_epochs: trial.fe_epochs,
            ft_epochs: trial.ft_epochs,
            options: options.clone(),
            model,
            train_x,
            train_y,
            val_x,
            val_y,
            optimizer,
            epochs_done: 0,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The optimizer of the current phase.
    pub fn optimizer(&self) -> &Adam {
        &self.optimizer
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

    /// Switches to fine-tuning: every parameter trains, with a new Adam whose learning rates
    /// come from the trial's decay strategy. Called by [`Trainer::run_epoch`] at the first
    /// fine-tuning epoch.
    fn start_fine_tuning(&mut self) -> Result<(), TrainError> {
        self.model.set_trainable(|_| true).map_err(torch("unfreezing the backbone"))?;
        let lrs = fine_tuning_lrs(&self.model, &self.lr_decay, self.training.fine_tuning_default_lr);
        let params =
            self.model.named_parameters().iter().zip(lrs).map(|((n, t), lr)| (n.clone(), t.shallow_clone(), lr));
        self.optimizer =
            Adam::new(params, AdamConfig { weight_decay: self.training.weight_decay, ..AdamConfig::default() });
        Ok(())
    }

    /// Trains and validates the next epoch and returns its metrics.
    pub fn run_epoch(&mut self) -> Result<EpochMetrics, TrainError> {
        let epoch = self.epochs_done + 1;
        if epoch > self.total_epochs() {
            return Err(TrainError::Permanent(format!("the trial has only {} epochs", self.total_epochs())));
        }
        let phase = Phase::of_epoch(epoch, self.fe_epochs);
        if phase == Phase::FineTuning && epoch == self.fe_epochs + 1 {
            self.start_fine_tuning()?;
        }
        let start = Instant::now();
        let (train_loss, train_accuracy) = self.train_pass(epoch, phase)?;
        let (val_loss, val_accuracy) = self.validate()?;
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

    fn check_cancel(&self) -> Result<(), TrainError> {
        if self.options.cancelled() { Err(TrainError::Cancelled) } else { Ok(()) }
    }

    fn train_pass(&mut self, epoch: u32, phase: Phase) -> Result<(f64, f64), TrainError> {
        let seed = self.training.seed;
        let n = self.train_y.size()[0] as usize;
        let order = Rng::derive(seed, &[STREAM_SHUFFLE, epoch as u64]).permutation(n);
        let aug_rng = Rng::derive(seed, &[STREAM_AUGMENT, epoch as u64]);
        self.model.set_dropout_seed(seed, epoch as u64);
        let mode = if phase == Phase::FeatureExtraction && self.training.freeze_bn_stats {
            ForwardMode::TRAIN_FROZEN_BN
        } else {
            ForwardMode::TRAIN
        };
        let device = self.options.device;
        // Batches are gathered and augmented ahead of the model (data::prefetch); the producer
        // draws from `aug_rng` in batch order, so the batches do not depend on its timing.
        let batch_list: Vec<Vec<i64>> =
            batches(&order, self.training.batch_size as usize).into_iter().map(<[i64]>::to_vec).collect();
        let producer = TrainBatches::new(
            &self.train_x,
            &self.train_y,
            batch_list,
            self.training.augment,
            aug_rng,
            prefetch::prefetch_depth(),
        );
        let step = |this: &mut Trainer,
                    batch: Batch,
                    loss_sum: &Tensor,
                    correct: &Tensor|
         -> Result<(Tensor, Tensor), TchError> {
            let (x, y) = (batch.images, batch.labels);
            let logits = this.model.forward(&x, mode)?;
            let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)?;
            this.optimizer.zero_grad();
            loss.f_backward()?;
            this.optimizer.step()?;
            tch::no_grad(|| {
                let b = batch.len as f64;
                let loss_sum = loss_sum.f_add(&loss.f_detach()?.f_to_kind(Kind::Double)?.f_mul_scalar(b)?)?;
                let hits = logits.f_argmax(1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?;
                Ok((loss_sum, correct.f_add(&hits)?))
            })
        };
        let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device)).map_err(torch("training"))?;
        let mut correct = Tensor::f_zeros([], (Kind::Int64, device)).map_err(torch("training"))?;
        let context = format!("training epoch {epoch}");
        for batch in producer {
            self.check_cancel()?;
            let batch = batch.map_err(|e| TrainError::from_torch(&context, e))?;
            (loss_sum, correct) =
                step(self, batch, &loss_sum, &correct).map_err(|e| TrainError::from_torch(&context, e))?;
        }
        let loss = loss_sum.f_double_value(&[]).map_err(torch("training"))?;
        let hits = correct.f_int64_value(&[]).map_err(torch("training"))?;
        Ok((loss / n as f64, hits as f64 / n as f64))
    }

    fn validate(&self) -> Result<(f64, f64), TrainError> {
        let n = self.val_y.size()[0] as usize;
        let order: Vec<i64> = (0..n as i64).collect();
        let device = self.options.device;
        tch::no_grad(|| {
            let run = || -> Result<(f64, i64), TchError> {
                let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device))?;
                let mut correct = Tensor::f_zeros([], (Kind::Int64, device))?;
                for idx in order.chunks(self.training.batch_size.max(1) as usize) {
                    if self.options.cancelled() {
                        break;
                    }
                    let (start, len) = (idx[0], idx.len() as i64);
                    let x = augment::eval_batch(&self.val_x.f_narrow(0, start, len)?)?;
                    let y = self.val_y.f_narrow(0, start, len)?;
                    let logits = self.model.forward(&x, ForwardMode::EVAL)?;
                    let loss = logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
                    loss_sum = loss_sum.f_add(&loss.f_to_kind(Kind::Double)?)?;
                    correct = correct.f_add(&logits.f_argmax(1, false)?.f_eq_tensor(&y)?.f_sum(Kind::Int64)?)?;
                }
                Ok((loss_sum.f_double_value(&[])?, correct.f_int64_value(&[])?))
            };
            let (loss, hits) = run().map_err(torch("validation"))?;
            self.check_cancel()?;
            Ok((loss / n as f64, hits as f64 / n as f64))
        })
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
        assert_eq!(e, TrainError::Permanent("step: mat1 and mat2 shapes cannot be multiplied".into()));
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
