//! The backbones, built from tch primitives with torchvision's exact `state_dict` names.
//!
//! A [`Model`] is a torchvision classification network (resnet18/34/50/101/152, vgg16_bn,
//! efficientnet_b0, mobilenet_v2, densenet121) whose classification head has been replaced by a
//! new, randomly initialised one with the task's number of classes (the recipe's step 1). Every
//! parameter and buffer lives in one [`tch::nn::VarStore`] under torchvision's name
//! (`layer1.0.downsample.0.weight`, `bn1.num_batches_tracked`, `classifier.6.bias`, …), so a
//! torchvision `state_dict` exported to `.safetensors` loads by name ([`Model::load_weights`])
//! and the backbone's layer groups (`sweep_core::Backbone::layer_groups`) select parameters by
//! name prefix.
//!
//! Initialisation follows torchvision (kaiming-normal convolutions over the fan-out — the fan-in
//! for densenet — BatchNorm weight 1 and bias 0; vgg's linear layers normal(0, 0.01) with zero
//! bias), except that the new head is initialised like a freshly constructed `nn.Linear`
//! (PyTorch's default), which is what the recipe's `model.fc = nn.Linear(…)` does. Random values
//! come from [`crate::rng`] streams derived from a seed, never from libtorch's global generator,
//! so building a model is deterministic even while other threads use libtorch. Training-mode
//! randomness — dropout in the vgg16_bn, mobilenet_v2 and efficientnet_b0 classifiers and
//! efficientnet_b0's stochastic depth — draws from a stream reseeded by
//! [`Model::set_dropout_seed`].
//!
//! `worker/tests/parity.rs` proves every backbone equal to torchvision's: the same `state_dict`
//! names, shapes and order, and the same logits and BatchNorm statistics on the same weights.

mod densenet;
mod efficientnet;
mod mobilenet;
mod resnet;
mod vgg;

pub use efficientnet::{EFFICIENTNET_B0_DROPOUT, EFFICIENTNET_STOCHASTIC_DEPTH};
pub use mobilenet::MOBILENET_V2_DROPOUT;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sweep_core::Backbone;
use sweep_core::backbone::{group_of, in_module};
use tch::{Device, Kind, TchError, Tensor, nn};

use crate::rng::{Rng, STREAM_DROPOUT, STREAM_INIT};

/// BatchNorm epsilon (torchvision's default).
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm running-statistics momentum (torchvision's default).
pub const BN_MOMENTUM: f64 = 0.1;
/// Dropout probability of vgg16_bn's classifier.
pub const VGG_DROPOUT: f64 = 0.5;

/// How a forward pass treats the layers whose behaviour differs between training and
/// evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardMode {
    /// Dropout active (training).
    pub train: bool,
    /// BatchNorm normalises with batch statistics and updates its running statistics; when
    /// false it normalises with the running statistics and leaves them unchanged.
    pub bn_train: bool,
}

impl ForwardMode {
    /// `model.train()`: dropout on, BatchNorm in training mode.
    pub const TRAIN: ForwardMode = ForwardMode { train: true, bn_train: true };
    /// `model.eval()`: dropout off, BatchNorm uses its running statistics.
    pub const EVAL: ForwardMode = ForwardMode { train: false, bn_train: false };
    /// Training with BatchNorm layers held in evaluation mode (`freeze_bn_stats`).
    pub const TRAIN_FROZEN_BN: ForwardMode = ForwardMode { train: true, bn_train: false };
}

/// Why a model could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The requested configuration cannot be built.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// The weights file is missing, unreadable or not a valid safetensors file.
    #[error("cannot read weights file {path}: {message}")]
    WeightsFile { path: PathBuf, message: String },
    /// A tensor the backbone needs is not in the weights file.
    #[error(
        "weights file {path} has no tensor `{name}`: it must hold {backbone}'s torchvision state_dict (tensor names such as `{example}`)"
    )]
    MissingTensor { path: PathBuf, name: String, backbone: &'static str, example: String },
    /// A tensor of the weights file has another shape than the backbone's.
    #[error("weights file {path}: tensor `{name}` has shape {found:?}, but {backbone} needs {expected:?}")]
    ShapeMismatch { path: PathBuf, name: String, backbone: &'static str, found: Vec<i64>, expected: Vec<i64> },
    /// The weights file holds tensors the backbone does not have (probably another backbone).
    #[error(
        "weights file {path} holds {count} tensor(s) that {backbone} does not have (is it another backbone's file?): {names}"
    )]
    UnexpectedTensors { path: PathBuf, backbone: &'static str, count: usize, names: String },
    /// libtorch refused an operation (out of memory, a device error, …).
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

/// What [`Model::load_weights`] or [`Model::load_state`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedWeights {
    /// Tensors copied from the file (parameters and buffers).
    pub loaded: usize,
    /// Head tensors of the file that were ignored (the new head keeps its random values);
    /// always empty when the head was loaded too.
    pub ignored_head: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// How a new tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Init {
    Zeros,
    Ones,
    /// Normal(0, std).
    Normal(f64),
    /// Uniform(-bound, bound).
    Uniform(f64),
}

/// Creates the variables of a model in module order, recording their names.
struct Builder {
    rng: Rng,
    device: Device,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
}

/// Elements generated per independent random stream when filling a tensor (lets large tensors
/// be filled in parallel while staying deterministic).
const INIT_CHUNK: usize = 1 << 16;

impl Builder {
    fn tensor(&mut self, shape: &[i64], init: Init) -> Result<Tensor, TchError> {
        let opts = (Kind::Float, self.device);
        let seed = self.rng.next_u64();
        let n = shape.iter().product::<i64>().max(0) as usize;
        let fill = |f: &(dyn Fn(&mut Rng, &mut [f32]) + Sync)| -> Result<Tensor, TchError> {
            let mut v = vec![0f32; n];
            v.par_chunks_mut(INIT_CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut r = Rng::derive(seed, &[i as u64]);
                f(&mut r, chunk);
            });
            Tensor::f_from_slice(&v)?.f_view(shape)?.f_to_device(self.device)
        };
        match init {
            Init::Zeros => Tensor::f_zeros(shape, opts),
            Init::Ones => Tensor::f_ones(shape, opts),
            Init::Normal(std) => fill(&|r, chunk| {
                for x in chunk {
                    *x = (r.normal() * std) as f32;
                }
            }),
            Init::Uniform(bound) => fill(&|r, chunk| {
                for x in chunk {
                    *x = r.uniform_in(-bound, bound) as f32;
                }
            }),
        }
    }

    fn param(&mut self, p: &nn::Path, name: &str, shape: &[i64], init: Init) -> Result<Tensor, TchError> {
        let t = self.tensor(shape, init)?;
        let full = p.path(name);
        let t = p.add(name, t, true);
        self.params.push((full, t.shallow_clone()));
        Ok(t)
    }

    fn buffer(&mut self, p: &nn::Path, name: &str, t: Tensor) -> Tensor {
        let full = p.path(name);
        let t = p.add(name, t, false);
        self.buffers.push((full, t.shallow_clone()));
        t
    }
}

/// How a convolution's weight is initialised: torchvision's `kaiming_normal_` with the ReLU
/// gain (std `sqrt(2 / fan)`), over the fan-out (resnet, vgg, mobilenet_v2, efficientnet) or
/// the fan-in (densenet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fan {
    Out,
    In,
}

/// Options of [`Conv2d::build`] besides the channel counts and kernel size.
#[derive(Debug, Clone, Copy)]
struct ConvOpts {
    stride: i64,
    padding: i64,
    groups: i64,
    bias: bool,
    fan: Fan,
}

impl ConvOpts {
    /// Stride 1, "same" padding for an odd kernel `k` (`(k - 1) / 2`, as torchvision's
    /// `Conv2dNormActivation`), no groups, no bias, fan-out initialisation.
    fn same(k: i64) -> ConvOpts {
        ConvOpts { stride: 1, padding: (k - 1) / 2, groups: 1, bias: false, fan: Fan::Out }
    }
}

/// `nn.Conv2d` (square kernel, no dilation).
#[derive(Debug)]
struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    groups: i64,
}

impl Conv2d {
    /// Kaiming-normal (`fan_out`, ReLU gain) weight, zero bias: torchvision's resnet and vgg
    /// convolution initialisation.
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &mut Builder,
        p: &nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
        bias: bool,
    ) -> Result<Conv2d, TchError> {
        Conv2d::build(b, p, cin, cout, k, ConvOpts { stride, padding, groups: 1, bias, fan: Fan::Out })
    }

    /// A convolution with weight `[cout, cin / groups, k, k]`, kaiming-normal over `opts.fan`
    /// (PyTorch's fans: fan-in `cin / groups · k²`, fan-out `cout · k²`), zero bias.
    fn build(b: &mut Builder, p: &nn::Path, cin: i64, cout: i64, k: i64, opts: ConvOpts) -> Result<Conv2d, TchError> {
        if opts.groups < 1 || cin % opts.groups != 0 || cout % opts.groups != 0 {
            return Err(TchError::Shape(format!("{cin} -> {cout} channels cannot form {} groups", opts.groups)));
        }
        let fan = match opts.fan {
            Fan::Out => cout * k * k,
            Fan::In => cin / opts.groups * k * k,
        };
        let std = (2.0 / fan as f64).sqrt();
        let weight = b.param(p, "weight", &[cout, cin / opts.groups, k, k], Init::Normal(std))?;
        let bias = if opts.bias { Some(b.param(p, "bias", &[cout], Init::Zeros)?) } else { None };
        Ok(Conv2d { weight, bias, stride: opts.stride, padding: opts.padding, groups: opts.groups })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.weight, self.bias.as_ref(), [self.stride; 2], [self.padding; 2], [1, 1], self.groups)
    }
}

/// `nn.BatchNorm2d` with affine parameters and tracked running statistics.
#[derive(Debug)]
struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm2d {
    fn new(b: &mut Builder, p: &nn::Path, c: i64) -> Result<BatchNorm2d, TchError> {
        let weight = b.param(p, "weight", &[c], Init::Ones)?;
        let bias = b.param(p, "bias", &[c], Init::Zeros)?;
        let running_mean = b.buffer(p, "running_mean", Tensor::f_zeros([c], (Kind::Float, b.device))?);
        let running_var = b.buffer(p, "running_var", Tensor::f_ones([c], (Kind::Float, b.device))?);
        let nbt = b.buffer(p, "num_batches_tracked", Tensor::f_zeros([] as [i64; 0], (Kind::Int64, b.device))?);
        Ok(BatchNorm2d { weight, bias, running_mean, running_var, num_batches_tracked: nbt })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        if train {
            // libtorch would silently produce a zero variance and NaN running statistics;
            // PyTorch's Python layer refuses, and so do we.
            let size = x.size();
            let per_channel: i64 = size.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, d)| *d).product();
            if per_channel <= 1 {
                return Err(TchError::Shape(format!(
                    "BatchNorm needs more than 1 value per channel when training, got input of size {size:?} (a batch of one image is too small at this image size)"
                )));
            }
        }
        let y = x.f_batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )?;
        if train {
            let mut n = self.num_batches_tracked.shallow_clone();
            let _ = tch::no_grad(|| n.f_add_scalar_(1))?;
        }
        Ok(y)
    }
}

/// `nn.Linear`.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// PyTorch's default `nn.Linear` initialisation: weight and bias uniform in
    /// `±1/sqrt(in_features)` (kaiming-uniform with a = sqrt(5)).
    fn new_default(b: &mut Builder, p: &nn::Path, cin: i64, cout: i64) -> Result<Linear, TchError> {
        let bound = 1.0 / (cin as f64).sqrt();
        let weight = b.param(p, "weight", &[cout, cin], Init::Uniform(bound))?;
        let bias = b.param(p, "bias", &[cout], Init::Uniform(bound))?;
        Ok(Linear { weight, bias })
    }

    /// Weight normal(0, std), zero bias (torchvision's vgg classifier).
    fn new_normal(b: &mut Builder, p: &nn::Path, cin: i64, cout: i64, std: f64) -> Result<Linear, TchError> {
        let weight = b.param(p, "weight", &[cout, cin], Init::Normal(std))?;
        let bias = b.param(p, "bias", &[cout], Init::Zeros)?;
        Ok(Linear { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, Some(&self.bias))
    }
}

/// The activation that ends a [`ConvBnAct`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// No activation (a projection).
    None,
    /// `nn.ReLU6`: `min(max(x, 0), 6)`.
    Relu6,
    /// `nn.SiLU`: `x · sigmoid(x)`.
    Silu,
}

impl Act {
    fn apply(self, x: Tensor) -> Result<Tensor, TchError> {
        match self {
            Act::None => Ok(x),
            Act::Relu6 => x.f_relu6(),
            Act::Silu => x.f_silu(),
        }
    }
}

/// torchvision's `Conv2dNormActivation`: a bias-free convolution at `<path>.0`, BatchNorm at
/// `<path>.1`, then an activation (which owns no tensors).
#[derive(Debug)]
struct ConvBnAct {
    conv: Conv2d,
    bn: BatchNorm2d,
    act: Act,
}

impl ConvBnAct {
    /// `Conv2dNormActivation(cin, cout, kernel_size=k, stride, groups)` with "same" padding and
    /// fan-out initialisation.
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &mut Builder,
        p: &nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        groups: i64,
        act: Act,
    ) -> Result<ConvBnAct, TchError> {
        let conv = Conv2d::build(b, &(p / 0), cin, cout, k, ConvOpts { stride, groups, ..ConvOpts::same(k) })?;
        let bn = BatchNorm2d::new(b, &(p / 1), cout)?;
        Ok(ConvBnAct { conv, bn, act })
    }

    fn forward(&self, x: &Tensor, bn_train: bool) -> Result<Tensor, TchError> {
        self.act.apply(self.bn.forward(&self.conv.forward(x)?, bn_train)?)
    }
}

/// torchvision's `_make_divisible(v, divisor)`: `v` rounded to the nearest multiple of
/// `divisor` (at least `divisor`), but not more than 10% below `v`.
fn make_divisible(v: f64, divisor: i64) -> i64 {
    let d = divisor as f64;
    let mut new_v = divisor.max(((v + d / 2.0) as i64) / divisor * divisor);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor;
    }
    new_v
}

/// torchvision's `stochastic_depth(x, p, "row")` in training mode: each sample (row of the
/// batch) of a residual branch is kept with probability `1 - p` and then scaled by
/// `1 / (1 - p)`, or zeroed; the choices come from `rng`.
fn stochastic_depth(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor, TchError> {
    if p <= 0.0 {
        return Ok(x.shallow_clone());
    }
    let survival = 1.0 - p;
    let scale = if survival > 0.0 { (1.0 / survival) as f32 } else { 0.0 };
    let size = x.size();
    let rows = size.first().copied().unwrap_or(0);
    let mask: Vec<f32> = (0..rows).map(|_| if rng.uniform() < survival { scale } else { 0.0 }).collect();
    let mut shape = vec![1i64; size.len()];
    if let Some(first) = shape.first_mut() {
        *first = rows;
    }
    let mask = Tensor::f_from_slice(&mask)?.f_view(shape.as_slice())?.f_to_device(x.device())?.f_to_kind(x.kind())?;
    x.f_mul(&mask)
}

/// Inverted dropout with a mask drawn from `rng` (`x * mask / (1 - p)`).
fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor, TchError> {
    if p <= 0.0 {
        return Ok(x.shallow_clone());
    }
    let keep = 1.0 - p;
    let scale = if keep > 0.0 { (1.0 / keep) as f32 } else { 0.0 };
    let n = x.numel();
    let mask: Vec<f32> = (0..n).map(|_| if rng.uniform() < keep { scale } else { 0.0 }).collect();
    let mask =
        Tensor::f_from_slice(&mask)?.f_view(x.size().as_slice())?.f_to_device(x.device())?.f_to_kind(x.kind())?;
    x.f_mul(&mask)
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
enum Arch {
    ResNet(resnet::ResNet),
    Vgg(vgg::Vgg),
    EfficientNet(efficientnet::EfficientNetB0),
    MobileNet(mobilenet::MobileNetV2),
    DenseNet(densenet::DenseNet121),
}

/// A backbone with a new classification head, ready to train.
pub struct Model {
    backbone: Backbone,
    num_classes: i64,
    vs: nn::VarStore,
    arch: Arch,
    params: Vec<(String, Tensor)>,
    buffers: Vec<(String, Tensor)>,
    /// Dropout masks and stochastic-depth choices; reseeded by [`Model::set_dropout_seed`].
    dropout_rng: RefCell<Rng>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("backbone", &self.backbone.name())
            .field("num_classes", &self.num_classes)
            .field("device", &self.vs.device())
            .field("parameters", &self.parameter_count())
            .finish()
    }
}

impl Model {
    /// Builds `backbone` with a new head of `num_classes` outputs on `device`, randomly
    /// initialised from seed 0. See [`Model::build_seeded`].
    pub fn build(backbone: Backbone, num_classes: i64, device: Device) -> Result<Model, ModelError> {
        Model::build_seeded(backbone, num_classes, device, 0)
    }

    /// Builds `backbone` with a new head of `num_classes` outputs on `device`; every random
    /// initial value comes from `seed`, so equal arguments give bit-identical models.
    pub fn build_seeded(backbone: Backbone, num_classes: i64, device: Device, seed: u64) -> Result<Model, ModelError> {
        if num_classes < 1 {
            return Err(ModelError::Config(format!("the head needs at least 1 output class, got {num_classes}")));
        }
        let vs = nn::VarStore::new(device);
        let mut b = Builder { rng: Rng::derive(seed, &[STREAM_INIT]), device, params: Vec::new(), buffers: Vec::new() };
        let root = vs.root();
        let arch = match backbone {
            Backbone::Vgg16Bn => Arch::Vgg(vgg::Vgg::new(&mut b, &root, num_classes)?),
            Backbone::EfficientnetB0 => {
                Arch::EfficientNet(efficientnet::EfficientNetB0::new(&mut b, &root, num_classes)?)
            }
            Backbone::MobilenetV2 => Arch::MobileNet(mobilenet::MobileNetV2::new(&mut b, &root, num_classes)?),
            Backbone::Densenet121 => Arch::DenseNet(densenet::DenseNet121::new(&mut b, &root, num_classes)?),
            Backbone::Resnet18
            | Backbone::Resnet34
            | Backbone::Resnet50
            | Backbone::Resnet101
            | Backbone::Resnet152 => Arch::ResNet(resnet::ResNet::new(&mut b, &root, backbone, num_classes)?),
        };
        let Builder { params, buffers, .. } = b;
        Ok(Model { backbone, num_classes, vs, arch, params, buffers, dropout_rng: RefCell::new(Rng::new(seed)) })
    }

    /// The architecture.
    pub fn backbone(&self) -> Backbone {
        self.backbone
    }

    /// Outputs of the (new) head.
    pub fn num_classes(&self) -> i64 {
        self.num_classes
    }

    /// Where the variables live.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The variable store holding every parameter and buffer under its torchvision name.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// Mutable access to the variable store (`VarStore::load`, `half`, `set_device`, …). Adding
    /// variables through it does not make them part of the model.
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// Trainable parameters in module order (torchvision's `named_parameters()` order).
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Buffers (`running_mean`, `running_var`, `num_batches_tracked`) in module order.
    pub fn named_buffers(&self) -> &[(String, Tensor)] {
        &self.buffers
    }

    /// Parameters then buffers: the names and tensors of torchvision's `state_dict`.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.params.iter().chain(&self.buffers).map(|(n, t)| (n.clone(), t.shallow_clone())).collect()
    }

    /// Number of scalar parameters (buffers excluded).
    pub fn parameter_count(&self) -> u64 {
        self.params.iter().map(|(_, t)| t.numel() as u64).sum()
    }

    /// True when parameter or buffer `name` belongs to the new head (`Backbone::head()`).
    pub fn is_head(&self, name: &str) -> bool {
        in_module(name, self.backbone.head())
    }

    /// For each of [`named_parameters`](Model::named_parameters), the index of its group in
    /// `Backbone::layer_groups()`, or `None` when it lies in no group.
    pub fn parameter_groups(&self) -> Vec<Option<usize>> {
        let groups = self.backbone.layer_groups();
        self.params.iter().map(|(n, _)| group_of(&groups, n)).collect()
    }

    /// Sets `requires_grad` of every parameter to `trainable(name)`.
    pub fn set_trainable(&self, trainable: impl Fn(&str) -> bool) -> Result<(), TchError> {
        for (name, t) in &self.params {
            let _ = t.f_set_requires_grad(trainable(name))?;
        }
        Ok(())
    }

    /// Reseeds the dropout masks and stochastic-depth choices (the trainer does so at the start
    /// of every epoch).
    pub fn set_dropout_seed(&self, seed: u64, epoch: u64) {
        *self.dropout_rng.borrow_mut() = Rng::derive(seed, &[STREAM_DROPOUT, epoch]);
    }

    /// Forward pass in training (`train = true`) or evaluation mode.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor, TchError> {
        self.forward(xs, if train { ForwardMode::TRAIN } else { ForwardMode::EVAL })
    }

    /// Forward pass: `xs` is a float `[N, 3, H, W]` batch (normalised), the result the
    /// `[N, num_classes]` logits.
    pub fn forward(&self, xs: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        self.classify(&self.features(xs, mode)?, mode)
    }

    /// The first part of [`Model::forward`]: the convolutional backbone, pooled and flattened
    /// to `[N, D]` — everything before the classifier's first linear layer or dropout.
    /// `forward(x) = classify(features(x))`, operation for operation. A sample's features do
    /// not depend on where in its batch it sits (convolutions and pooling treat samples
    /// independently; a matrix product, which may not on the CPU, is left to `classify`).
    pub fn features(&self, xs: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        let size = xs.size();
        if size.len() != 4 || size[1] != 3 {
            return Err(TchError::Shape(format!("expected a [N, 3, H, W] image batch, got {size:?}")));
        }
        match &self.arch {
            Arch::ResNet(r) => r.features(xs, mode),
            Arch::Vgg(v) => v.features(xs, mode),
            Arch::EfficientNet(e) => e.features(xs, mode, &mut self.dropout_rng.borrow_mut()),
            Arch::MobileNet(m) => m.features(xs, mode),
            Arch::DenseNet(d) => d.features(xs, mode),
        }
    }

    /// The rest of [`Model::forward`] on [`Model::features`]' output: the logits.
    pub fn classify(&self, features: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        match &self.arch {
            Arch::ResNet(r) => r.classify(features),
            Arch::Vgg(v) => v.classify(features, mode, &mut self.dropout_rng.borrow_mut()),
            Arch::EfficientNet(e) => e.classify(features, mode, &mut self.dropout_rng.borrow_mut()),
            Arch::MobileNet(m) => m.classify(features, mode, &mut self.dropout_rng.borrow_mut()),
            Arch::DenseNet(d) => d.classify(features),
        }
    }

    /// True when [`Model::features`] in `mode` is a function of the input and the weights
    /// alone — it draws nothing at random and changes no buffer — so that its value for an
    /// image can be computed once and reused while the parameters it reads stay frozen:
    /// BatchNorm must not train, and efficientnet_b0's stochastic depth must be off.
    pub fn features_are_pure(&self, mode: ForwardMode) -> bool {
        let stochastic_depth = mode.train && matches!(self.arch, Arch::EfficientNet(_));
        !(mode.bn_train || stochastic_depth)
    }

    /// Loads a torchvision `state_dict` saved as `.safetensors` into every parameter and buffer
    /// except the head, which keeps its new random values whatever the file holds for it (a
    /// 1000-class ImageNet head, or nothing). Every other tensor must be in the file with the
    /// same shape, and the file must hold nothing else; all is checked before anything is
    /// copied, so a refused file leaves the model unchanged. Values are converted to the
    /// model's dtype and device.
    pub fn load_weights(&self, path: &Path) -> Result<LoadedWeights, ModelError> {
        self.load_state(path, false)
    }

    /// Loads a `.safetensors` `state_dict` like [`Model::load_weights`]; with `include_head`
    /// the head is loaded too (its tensors must then be in the file with the new head's shape,
    /// `[num_classes, in_features]` — a checkpoint of this model, or a reference model with the
    /// same number of classes), otherwise it keeps its values whatever the file holds for it.
    pub fn load_state(&self, path: &Path, include_head: bool) -> Result<LoadedWeights, ModelError> {
        let backbone = self.backbone.name();
        let file_err = |message: String| ModelError::WeightsFile { path: path.to_path_buf(), message };
        if !path.is_file() {
            return Err(file_err(if path.exists() { "not a regular file".into() } else { "no such file".into() }));
        }
        let tensors = Tensor::read_safetensors(path).map_err(|e| file_err(e.to_string()))?;
        let mut file: HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut ignored_head: Vec<String> =
            if include_head { Vec::new() } else { file.keys().filter(|n| self.is_head(n)).cloned().collect() };
        ignored_head.sort();
        for n in &ignored_head {
            file.remove(n);
        }
        let mut plan = Vec::new();
        for (name, dst) in self.params.iter().chain(&self.buffers) {
            if !include_head && self.is_head(name) {
                continue;
            }
            let Some(src) = file.remove(name) else {
                return Err(ModelError::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    backbone,
                    example: self.params.first().map(|(n, _)| n.clone()).unwrap_or_default(),
                });
            };
            if src.size() != dst.size() {
                return Err(ModelError::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    backbone,
                    found: src.size(),
                    expected: dst.size(),
                });
            }
            plan.push((dst, src));
        }
        if !file.is_empty() {
            let mut extra: Vec<String> = file.into_keys().collect();
            extra.sort();
            let count = extra.len();
            let mut names = extra.iter().take(5).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            if count > 5 {
                names.push_str(", …");
            }
            return Err(ModelError::UnexpectedTensors { path: path.to_path_buf(), backbone, count, names });
        }
        let loaded = plan.len();
        tch::no_grad(|| -> Result<(), TchError> {
            for (dst, src) in plan {
                let mut dst = dst.shallow_clone();
                let src = src.f_to_device(dst.device())?.f_to_kind(dst.kind())?;
                dst.f_copy_(&src)?;
            }
            Ok(())
        })?;
        Ok(LoadedWeights { loaded, ignored_head })
    }

    /// Saves every parameter and buffer (head included) to a `.safetensors` file under its
    /// torchvision name: the format [`Model::load_weights`] reads.
    pub fn save_weights(&self, path: &Path) -> Result<(), TchError> {
        let cpu: Vec<(String, Tensor)> = self
            .state_dict()
            .into_iter()
            .map(|(n, t)| Ok((n, t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?)))
            .collect::<Result<_, TchError>>()?;
        Tensor::write_safetensors(&cpu, path)
    }
}

#[cfg(test)]
mod tests;
