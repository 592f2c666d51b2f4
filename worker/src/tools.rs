//! The worker's offline tools: `sweep-worker inspect` (the recipe's exploratory model analysis:
//! parameters, head, layer groups and their fine-tuning learning rates) and `sweep-worker
//! predict` (top-K classes of images with trained weights, using the validation transforms).

use std::path::{Path, PathBuf};

use serde::Serialize;
use sweep_core::Backbone;
use sweep_core::lr::LrDecay;
use tch::{Device, Kind, Tensor};

use crate::augment;
use crate::checkpoint::{self, Metadata};
use crate::data;
use crate::model::{ForwardMode, Model};

/// One layer group of an inspected backbone.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupReport {
    pub name: String,
    /// Parameter names in the group (empty for modules without parameters, e.g. a ReLU).
    pub params: Vec<String>,
    /// Fine-tuning learning rate of the group; `None` when no strategy was given.
    pub lr: Option<f64>,
    /// Scalars in the group's parameters.
    pub parameters: u64,
}

/// `sweep-worker inspect --output json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inspection {
    pub backbone: String,
    pub parameters: u64,
    /// The module replaced by the new head (the recipe's `new_layers`).
    pub head: String,
    /// The whole old classifier (the recipe's `classifier_layers`).
    pub classifier: String,
    pub num_classes: i64,
    /// Layer groups from the input to the head.
    pub groups: Vec<GroupReport>,
    /// Parameters in no group; they train at `default_lr`.
    pub ungrouped: Vec<String>,
    pub default_lr: f64,
}

/// Builds `backbone` with a `num_classes` head and reports its groups with the learning rates
/// `decay` gives them.
pub fn inspect(
    backbone: Backbone,
    num_classes: i64,
    decay: Option<&LrDecay>,
    default_lr: f64,
) -> anyhow::Result<Inspection> {
    let model = Model::build_seeded(backbone, num_classes, Device::Cpu, 0)?;
    let names = backbone.layer_groups();
    let lrs = decay.map(|d| d.group_lrs(names.len()));
    let mut groups: Vec<GroupReport> = names
        .iter()
        .enumerate()
        .map(|(i, n)| GroupReport {
            name: n.clone(),
            params: Vec::new(),
            lr: lrs.as_ref().map(|l| l[i]),
            parameters: 0,
        })
        .collect();
    let mut ungrouped = Vec::new();
    for ((name, tensor), group) in model.named_parameters().iter().zip(model.parameter_groups()) {
        match group {
            Some(g) => {
                groups[g].params.push(name.clone());
                groups[g].parameters += tensor.numel() as u64;
            }
            None => ungrouped.push(name.clone()),
        }
    }
    Ok(Inspection {
        backbone: backbone.name().into(),
        parameters: model.parameter_count(),
        head: backbone.head().into(),
        classifier: backbone.classifier().into(),
        num_classes,
        groups,
        ungrouped,
        default_lr,
    })
}

/// The people's view of [`Inspection`].
pub fn inspection_text(i: &Inspection) -> String {
    let mut out = format!(
        "{}: {} parameters with a {}-class head\nhead (new layers): {}\nclassifier layers: {}\n\n",
        i.backbone,
        group_digits(i.parameters),
        i.num_classes,
        i.head,
        i.classifier
    );
    let width = i.groups.iter().map(|g| g.name.len()).max().unwrap_or(5).max(11);
    out.push_str(&format!("{:<width$}  {:>10}  {:>7}  {:>11}  names\n", "group", "lr", "tensors", "parameters"));
    for g in &i.groups {
        let lr = g.lr.map(|l| format!("{l:.3e}")).unwrap_or_else(|| "-".into());
        // Long groups (a resnet stage) show their first and last tensor; --output json has all.
        let names = match g.params.as_slice() {
            [] => "(no parameters)".to_string(),
            [one] => one.clone(),
            [first, second] => format!("{first}, {second}"),
            [first, .., last] => format!("{first} … {last}"),
        };
        out.push_str(&format!(
            "{:<width$}  {lr:>10}  {:>7}  {:>11}  {names}\n",
            g.name,
            g.params.len(),
            group_digits(g.parameters)
        ));
    }
    if !i.ungrouped.is_empty() {
        out.push_str(&format!(
            "{:<width$}  {:>10.3e}  {:>7}  {:>11}  {}\n",
            "(ungrouped)",
            i.default_lr,
            i.ungrouped.len(),
            "",
            i.ungrouped.join(", ")
        ));
    }
    out
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------------------------

/// One predicted class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    pub index: i64,
    pub class: String,
    pub probability: f64,
}

/// Predictions for one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImagePredictions {
    pub image: String,
    pub predictions: Vec<Prediction>,
}

/// What `predict` needs to know besides the weights.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    /// The architecture; default: the checkpoint metadata's (an error without metadata).
    pub backbone: Option<Backbone>,
    pub weights: PathBuf,
    /// Number of outputs of the head; default: the checkpoint metadata's class count, else the
    /// head's shape in the weights file.
    pub num_classes: Option<i64>,
    /// Validation crop size; default: the checkpoint metadata's, else 224.
    pub image_size: Option<u32>,
    pub top: usize,
    pub device: Device,
}

/// Reads the shape of tensor `name` from a safetensors header, without loading the file.
pub fn safetensors_shape(path: &Path, name: &str) -> anyhow::Result<Option<Vec<i64>>> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("cannot open weights {}: {e}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|_| anyhow::anyhow!("{} is not a safetensors file (too short)", path.display()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        anyhow::bail!("{} is not a safetensors file (header of {len} bytes)", path.display());
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|_| anyhow::anyhow!("{} is truncated", path.display()))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("{} is not a safetensors file: {e}", path.display()))?;
    Ok(json
        .get(name)
        .and_then(|t| t.get("shape"))
        .and_then(|s| s.as_array())
        .map(|dims| dims.iter().filter_map(|d| d.as_i64()).collect()))
}

/// A model with trained weights, ready to classify images.
pub struct Predictor {
    model: Model,
    classes: Vec<String>,
    image_size: u32,
    top: usize,
}

impl Predictor {
    pub fn load(o: &PredictOptions) -> anyhow::Result<Predictor> {
        if o.top == 0 {
            anyhow::bail!("--top must be at least 1");
        }
        let meta: Option<Metadata> = checkpoint::read_metadata(&o.weights)?;
        let backbone = match (o.backbone, &meta) {
            (Some(b), Some(m)) if m.id.backbone != b.name() => anyhow::bail!(
                "{} holds {} weights (see {}), not {}",
                o.weights.display(),
                m.id.backbone,
                checkpoint::metadata_path(&o.weights).display(),
                b.name()
            ),
            (Some(b), _) => b,
            (None, Some(m)) => Backbone::from_name(&m.id.backbone).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} names the backbone `{}`, which this worker does not know; pass --backbone",
                    checkpoint::metadata_path(&o.weights).display(),
                    sweep_core::text::escape(&m.id.backbone)
                )
            })?,
            (None, None) => anyhow::bail!(
                "{} has no metadata ({} is missing) to say its backbone; pass --backbone",
                o.weights.display(),
                checkpoint::metadata_path(&o.weights).display()
            ),
        };
        let head_weight = format!("{}.weight", backbone.head());
        let num_classes = match (o.num_classes, &meta) {
            (Some(n), _) => n,
            (None, Some(m)) => m.id.classes.len() as i64,
            (None, None) => match safetensors_shape(&o.weights, &head_weight)? {
                Some(shape) if !shape.is_empty() => shape[0],
                _ => anyhow::bail!(
                    "{} has no tensor {head_weight}; is it {} weights? Pass --num-classes if it is",
                    o.weights.display(),
                    backbone.name()
                ),
            },
        };
        let classes = match &meta {
            Some(m) if m.id.classes.len() as i64 == num_classes => m.id.classes.clone(),
            _ => (0..num_classes).map(|i| i.to_string()).collect(),
        };
        let image_size = o.image_size.or(meta.as_ref().map(|m| m.id.image_size)).unwrap_or(224);
        let model = Model::build_seeded(backbone, num_classes, o.device, 0)?;
        model.load_state(&o.weights, true)?;
        Ok(Predictor { model, classes, image_size, top: o.top.min(num_classes as usize) })
    }

    pub fn image_size(&self) -> u32 {
        self.image_size
    }

    /// Class probabilities of one image (validation transforms: resize, centre crop,
    /// ImageNet normalisation), highest first, `top` of them.
    pub fn predict(&self, image: &Path) -> anyhow::Result<ImagePredictions> {
        let s = self.image_size as i64;
        let pixels = data::decode_image(image, self.image_size)?;
        let probs = tch::no_grad(|| -> Result<Tensor, tch::TchError> {
            let x = Tensor::f_from_slice(&pixels)?.f_view([1, 3, s, s])?.f_to_device(self.model.device())?;
            let logits = self.model.forward(&augment::eval_batch(&x)?, ForwardMode::EVAL)?;
            logits.f_softmax(1, Kind::Float)?.f_to_device(Device::Cpu)?.f_view([-1])
        })
        .map_err(|e| anyhow::anyhow!("classifying {}: {e}", image.display()))?;
        let probs: Vec<f32> =
            Vec::<f32>::try_from(&probs).map_err(|e| anyhow::anyhow!("reading probabilities: {e}"))?;
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let predictions = order
            .into_iter()
            .take(self.top)
            .map(|i| Prediction { index: i as i64, class: self.classes[i].clone(), probability: f64::from(probs[i]) })
            .collect();
        Ok(ImagePredictions { image: image.display().to_string(), predictions })
    }
}

/// The people's view of predictions.
pub fn predictions_text(all: &[ImagePredictions]) -> String {
    let mut out = String::new();
    for p in all {
        out.push_str(&format!("{}\n", p.image));
        for (rank, q) in p.predictions.iter().enumerate() {
            out.push_str(&format!("  {:>2}. {:<24} {:>7.3}%\n", rank + 1, q.class, q.probability * 100.0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_grouped() {
        assert_eq!(group_digits(138_365_992), "138,365,992");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
    }
}

// ---------------------------------------------------------------------------------------------

/// `sweep-worker bench`: training throughput of a backbone on random images.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub backbone: Backbone,
    pub batch: i64,
    pub image_size: i64,
    pub steps: usize,
    pub warmup: usize,
    /// Forward and loss under fp16 autocast (fp32 master weights), as `torch.autocast`.
    pub fp16: bool,
    /// Adam over flat buffers ([`Adam::flat`](crate::adam::Adam::flat)), one parameter at a
    /// time, or (`None`) as training runs it on the device
    /// ([`Adam::for_device`](crate::adam::Adam::for_device)).
    pub flat_adam: Option<bool>,
    pub device: Device,
}

/// What `sweep-worker bench` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    pub implementation: String,
    pub device: String,
    pub backbone: String,
    pub precision: String,
    pub batch: i64,
    pub image_size: i64,
    pub steps: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Where a step's time goes, in seconds per step (summed over the timed steps, divided by
    /// their number; on CUDA each phase ends with a synchronisation).
    pub phases: BenchPhases,
}

/// A training step's phases, as `tools/bench_torch_train.py` times them too.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BenchPhases {
    /// Forward pass in train mode and the cross-entropy loss.
    pub forward: f64,
    /// Zeroing the gradients and the backward pass.
    pub backward: f64,
    /// The optimizer's step.
    pub optimizer: f64,
}

/// The CPU's model name (`/proc/cpuinfo`), for benchmark reports; "unknown CPU" elsewhere.
pub fn cpu_model() -> String {
    crate::devices::cpu_model_name().unwrap_or_else(|| "unknown CPU".into())
}

/// The bench's limits on its options.
fn check_bench_options(o: &BenchOptions) -> anyhow::Result<()> {
    if o.batch < 2 || o.image_size < 32 || o.steps == 0 {
        anyhow::bail!("bench needs --batch ≥ 2, --image-size ≥ 32 and --steps ≥ 1");
    }
    Ok(())
}

/// Fine-tuning's learning rate of each of `model`'s parameters under the recipe's strategy for
/// its backbone (linear for vgg16_bn, exponential otherwise), as the benches train.
fn recipe_lrs(model: &Model) -> Vec<f64> {
    let decay = match model.backbone() {
        Backbone::Vgg16Bn => LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 },
        _ => LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 },
    };
    crate::train::fine_tuning_lrs(model, &decay, 1e-8)
}

/// What both benches train: the backbone with a 1000-class head (seed 0), fine-tuning's
/// learning rate of each parameter ([`recipe_lrs`]), and one batch of random images and labels
/// on the device (the options checked by the caller).
fn bench_setup(o: &BenchOptions) -> anyhow::Result<(Model, Vec<f64>, Tensor, Tensor)> {
    let model = Model::build_seeded(o.backbone, 1000, o.device, 0)?;
    let lrs = recipe_lrs(&model);
    let x = Tensor::f_randn([o.batch, 3, o.image_size, o.image_size], (Kind::Float, o.device))?;
    let y = Tensor::f_randint(1000, [o.batch], (Kind::Int64, o.device))?;
    Ok((model, lrs, x, y))
}

/// What [`compare_adam_layouts`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdamComparison {
    pub device: String,
    pub backbone: String,
    pub steps: usize,
    pub parameters: usize,
    /// Every parameter and both moments bit-identical after the steps.
    pub identical: bool,
    /// Names of the parameters that differ (weights or moments).
    pub differing: Vec<String>,
}

/// Trains `o.steps` steps of the backbone (fine-tuning's per-layer rates, random images) with
/// the flat-buffer Adam, and steps a per-parameter Adam over copies of the same parameters with
/// exactly the same gradients (each step's gradients, copied, through a backward pass of
/// `Σ p·g` — whose gradient is `g` exactly); then compares weights and moments bit for bit.
/// Only the optimizer can make them differ: the check `scripts/gpu-check.sh` runs on a card.
pub fn compare_adam_layouts(o: &BenchOptions) -> anyhow::Result<AdamComparison> {
    use crate::adam::{Adam, AdamConfig};
    check_bench_options(o)?;
    let (model, lrs, x, y) = bench_setup(o)?;
    let copies: Vec<(String, Tensor, f64)> = model
        .named_parameters()
        .iter()
        .zip(&lrs)
        .map(|((n, t), lr)| Ok((n.clone(), tch::no_grad(|| t.f_detach_copy())?.f_set_requires_grad(true)?, *lr)))
        .collect::<Result<_, tch::TchError>>()?;
    let params = model.named_parameters().iter().zip(&lrs).map(|((n, t), lr)| (n.clone(), t.shallow_clone(), *lr));
    let mut flat = Adam::flat(params, AdamConfig::default())?;
    if !flat.is_flat() {
        anyhow::bail!("the parameters could not be laid out flat on {:?}", o.device);
    }
    let mut each =
        Adam::new(copies.iter().map(|(n, t, lr)| (n.clone(), t.shallow_clone(), *lr)), AdamConfig::default());
    for _ in 0..o.steps {
        flat.zero_grad();
        let logits = model.forward(&x, ForwardMode::TRAIN)?;
        logits.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?.f_backward()?;
        let grads: Vec<Tensor> =
            model.named_parameters().iter().map(|(_, t)| t.grad().f_detach_copy()).collect::<Result<_, _>>()?;
        each.zero_grad();
        let mut surrogate = Tensor::f_zeros([], (Kind::Float, o.device))?;
        for ((_, p, _), g) in copies.iter().zip(&grads) {
            surrogate = surrogate.f_add(&p.f_mul(g)?.f_sum(Kind::Float)?)?;
        }
        surrogate.f_backward()?;
        for ((_, p, _), g) in copies.iter().zip(&grads) {
            if !p.grad().equal(g) {
                anyhow::bail!("the surrogate's gradient is not the model's: the comparison is void");
            }
        }
        flat.step()?;
        each.step()?;
    }
    let mut differing = Vec::new();
    for (a, b) in flat.params().iter().zip(each.params()) {
        let same_state = match (&a.state, &b.state) {
            (Some(s), Some(t)) => s.step == t.step && s.exp_avg.equal(&t.exp_avg) && s.exp_avg_sq.equal(&t.exp_avg_sq),
            (None, None) => true,
            _ => false,
        };
        if !a.tensor.equal(&b.tensor) || !same_state {
            differing.push(a.name.clone());
        }
    }
    Ok(AdamComparison {
        device: format!("{:?}", o.device),
        backbone: o.backbone.name().into(),
        steps: o.steps,
        parameters: flat.params().len(),
        identical: differing.is_empty(),
        differing,
    })
}

/// Times `steps` full training steps (forward in train mode, cross-entropy, backward, the
/// worker's Adam over every parameter) after `warmup` untimed ones, with a 1000-class head.
/// The same work as `tools/bench_torch_train.py` does in PyTorch eager.
pub fn bench_training(o: &BenchOptions) -> anyhow::Result<BenchResult> {
    use crate::adam::{Adam, AdamConfig};
    check_bench_options(o)?;
    if o.fp16 && o.device == Device::Cpu {
        anyhow::bail!("fp16 autocast is a CUDA feature here; use --device cuda:N or --precision fp32");
    }
    if let Device::Cuda(_) = o.device {
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let (model, lrs, x, y) = bench_setup(o)?;
    let params = model.named_parameters().iter().zip(lrs).map(|((n, t), lr)| (n.clone(), t.shallow_clone(), lr));
    let mut adam = match o.flat_adam {
        None => Adam::for_device(params, AdamConfig::default())?,
        Some(true) => Adam::flat(params, AdamConfig::default())?,
        Some(false) => Adam::new(params, AdamConfig::default()),
    };
    let sync = || {
        if let Device::Cuda(i) = o.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // One step, each phase timed (added to `phases`).
    let mut step = |phases: &mut BenchPhases| -> Result<(), tch::TchError> {
        let t = std::time::Instant::now();
        let loss = tch::autocast(o.fp16, || -> Result<Tensor, tch::TchError> {
            model.forward(&x, ForwardMode::TRAIN)?.f_cross_entropy_loss::<Tensor>(
                &y,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )
        })?;
        sync();
        let forward = t.elapsed().as_secs_f64();
        adam.zero_grad();
        loss.f_backward()?;
        sync();
        let backward = t.elapsed().as_secs_f64();
        adam.step()?;
        sync();
        let optimizer = t.elapsed().as_secs_f64();
        phases.forward += forward;
        phases.backward += backward - forward;
        phases.optimizer += optimizer - backward;
        Ok(())
    };
    let mut phases = BenchPhases::default();
    for _ in 0..o.warmup {
        step(&mut phases)?;
    }
    sync();
    let mut phases = BenchPhases::default();
    let start = std::time::Instant::now();
    for _ in 0..o.steps {
        step(&mut phases)?;
    }
    sync();
    let seconds = start.elapsed().as_secs_f64();
    let per_step = |s: f64| s / o.steps as f64;
    let phases = BenchPhases {
        forward: per_step(phases.forward),
        backward: per_step(phases.backward),
        optimizer: per_step(phases.optimizer),
    };
    Ok(BenchResult {
        implementation: match (o.flat_adam, adam.is_flat()) {
            (None, _) => "sweep-worker (tch)".into(),
            (Some(_), true) => "sweep-worker (tch, flat Adam)".into(),
            (Some(_), false) => "sweep-worker (tch, Adam per parameter)".into(),
        },
        device: format!("{:?}", o.device),
        backbone: o.backbone.name().into(),
        precision: if o.fp16 { "fp16".into() } else { "fp32".into() },
        batch: o.batch,
        image_size: o.image_size,
        steps: o.steps,
        seconds,
        images_per_second: (o.batch as f64) * (o.steps as f64) / seconds,
        phases,
    })
}
