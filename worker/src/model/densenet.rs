//! torchvision's densenet121 (`torchvision.models.densenet121`: DenseNet-BC, growth rate 32,
//! bottleneck width 4 × 32, blocks of 6, 12, 24 and 16 layers, 64 initial features).
//!
//! Module names: `features.conv0` (7×7, stride 2), `features.norm0`, then ReLU and a 3×3
//! stride-2 max-pool; `features.denseblock{1..4}.denselayer{1..n}.{norm1, conv1, norm2, conv2}`
//! (BatchNorm, ReLU, 1×1 convolution to 128 channels, BatchNorm, ReLU, 3×3 convolution to 32
//! new channels, concatenated to the block's running feature map);
//! `features.transition{1..3}.{norm, conv}` (BatchNorm, ReLU, 1×1 convolution halving the
//! channels, 2×2 average pool); `features.norm5`; then ReLU, global average pooling and the
//! new head `classifier` (Linear(1024, num_classes)). Convolutions are initialised
//! kaiming-normal over the fan-in, as torchvision's DenseNet does.
//!
//! torchvision's `memory_efficient` option only recomputes the bottleneck (checkpointing) to
//! save memory during backward: the values are those of the plain path implemented here. The
//! ImageNet checkpoints' old key names (`norm.1`, `conv.2`, …) are renamed by torchvision when
//! it loads them, so an exported `state_dict` has the names above.

use tch::{TchError, Tensor, nn};

use super::{BatchNorm2d, Builder, Conv2d, ConvOpts, Fan, ForwardMode, Linear};

const GROWTH_RATE: i64 = 32;
const BN_SIZE: i64 = 4;
const BLOCKS: [usize; 4] = [6, 12, 24, 16];
const INIT_FEATURES: i64 = 64;

fn conv(b: &mut Builder, p: &nn::Path, cin: i64, cout: i64, k: i64) -> Result<Conv2d, TchError> {
    Conv2d::build(b, p, cin, cout, k, ConvOpts { fan: Fan::In, ..ConvOpts::same(k) })
}

/// `_DenseLayer` (drop rate 0).
#[derive(Debug)]
struct DenseLayer {
    norm1: BatchNorm2d,
    conv1: Conv2d,
    norm2: BatchNorm2d,
    conv2: Conv2d,
}

impl DenseLayer {
    fn new(b: &mut Builder, p: &nn::Path, cin: i64) -> Result<DenseLayer, TchError> {
        let width = BN_SIZE * GROWTH_RATE;
        let norm1 = BatchNorm2d::new(b, &(p / "norm1"), cin)?;
        let conv1 = conv(b, &(p / "conv1"), cin, width, 1)?;
        let norm2 = BatchNorm2d::new(b, &(p / "norm2"), width)?;
        let conv2 = conv(b, &(p / "conv2"), width, GROWTH_RATE, 3)?;
        Ok(DenseLayer { norm1, conv1, norm2, conv2 })
    }

    /// The new features computed from every earlier feature map of the block.
    fn forward(&self, features: &[Tensor], bn_train: bool) -> Result<Tensor, TchError> {
        let x = Tensor::f_cat(features, 1)?;
        let y = self.conv1.forward(&self.norm1.forward(&x, bn_train)?.f_relu()?)?;
        self.conv2.forward(&self.norm2.forward(&y, bn_train)?.f_relu()?)
    }
}

/// `_Transition`.
#[derive(Debug)]
struct Transition {
    norm: BatchNorm2d,
    conv: Conv2d,
}

impl Transition {
    fn forward(&self, x: &Tensor, bn_train: bool) -> Result<Tensor, TchError> {
        let y = self.conv.forward(&self.norm.forward(x, bn_train)?.f_relu()?)?;
        y.f_avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None)
    }
}

/// densenet121 with a new `classifier` head.
#[derive(Debug)]
pub(super) struct DenseNet121 {
    conv0: Conv2d,
    norm0: BatchNorm2d,
    /// Each dense block, followed by its transition (none after the last block).
    blocks: Vec<(Vec<DenseLayer>, Option<Transition>)>,
    norm5: BatchNorm2d,
    classifier: Linear,
}

impl DenseNet121 {
    pub(super) fn new(b: &mut Builder, root: &nn::Path, num_classes: i64) -> Result<DenseNet121, TchError> {
        let fp = root / "features";
        let conv0 = Conv2d::build(
            b,
            &(&fp / "conv0"),
            3,
            INIT_FEATURES,
            7,
            ConvOpts { stride: 2, fan: Fan::In, ..ConvOpts::same(7) },
        )?;
        let norm0 = BatchNorm2d::new(b, &(&fp / "norm0"), INIT_FEATURES)?;
        let mut channels = INIT_FEATURES;
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        for (i, &n) in BLOCKS.iter().enumerate() {
            let bp = &fp / format!("denseblock{}", i + 1);
            let mut layers = Vec::with_capacity(n);
            for l in 0..n {
                let cin = channels + l as i64 * GROWTH_RATE;
                layers.push(DenseLayer::new(b, &(&bp / format!("denselayer{}", l + 1)), cin)?);
            }
            channels += n as i64 * GROWTH_RATE;
            let transition = if i + 1 < BLOCKS.len() {
                let tp = &fp / format!("transition{}", i + 1);
                let norm = BatchNorm2d::new(b, &(&tp / "norm"), channels)?;
                let conv = conv(b, &(&tp / "conv"), channels, channels / 2, 1)?;
                channels /= 2;
                Some(Transition { norm, conv })
            } else {
                None
            };
            blocks.push((layers, transition));
        }
        let norm5 = BatchNorm2d::new(b, &(&fp / "norm5"), channels)?;
        let classifier = Linear::new_default(b, &(root / "classifier"), channels, num_classes)?;
        Ok(DenseNet121 { conv0, norm0, blocks, norm5, classifier })
    }

    /// Everything before `classifier`: the pooled `[N, 1024]` features.
    pub(super) fn features(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        let bn = mode.bn_train;
        let mut y = self.norm0.forward(&self.conv0.forward(x)?, bn)?.f_relu()?;
        y = y.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for (layers, transition) in &self.blocks {
            let mut features = vec![y];
            for layer in layers {
                let new = layer.forward(&features, bn)?;
                features.push(new);
            }
            y = Tensor::f_cat(&features, 1)?;
            if let Some(t) = transition {
                y = t.forward(&y, bn)?;
            }
        }
        let y = self.norm5.forward(&y, bn)?.f_relu()?;
        y.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)
    }

    /// The head on [`DenseNet121::features`].
    pub(super) fn classify(&self, features: &Tensor) -> Result<Tensor, TchError> {
        self.classifier.forward(features)
    }
}
