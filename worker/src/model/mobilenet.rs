//! torchvision's mobilenet_v2 (`torchvision.models.mobilenet_v2`, width 1.0).
//!
//! `features` holds 19 modules: `features.0` the stem `Conv2dNormActivation(3, 32, stride 2)`,
//! `features.1` … `features.17` inverted residuals, `features.18` a 1×1 `Conv2dNormActivation`
//! to 1280 channels, all with ReLU6. An inverted residual's `conv` is a Sequential:
//! `conv.0` the 1×1 expansion (absent when the expand ratio is 1), then the 3×3 depthwise
//! `Conv2dNormActivation`, the 1×1 projection convolution and its BatchNorm — so
//! `features.1.conv.{0.0, 0.1, 1, 2}` and `features.2.conv.{0.0, 0.1, 1.0, 1.1, 2, 3}`. Then
//! global average pooling and `classifier`: Dropout(0.2) at `classifier.0`, Linear(1280,
//! num_classes) at `classifier.1` (the new head).

use sweep_core::backbone::MOBILENET_V2_FEATURE_MODULES;
use tch::{TchError, Tensor, nn};

use super::{Act, BatchNorm2d, Builder, Conv2d, ConvBnAct, ConvOpts, ForwardMode, Linear, dropout, make_divisible};
use crate::rng::Rng;

/// Dropout probability of mobilenet_v2's classifier.
pub const MOBILENET_V2_DROPOUT: f64 = 0.2;

/// torchvision's `inverted_residual_setting`: expand ratio `t`, output channels `c`, blocks `n`,
/// stride of the first block `s`.
const SETTING: [(i64, i64, usize, i64); 7] =
    [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];
const STEM_CHANNELS: i64 = 32;
const LAST_CHANNELS: i64 = 1280;

/// `InvertedResidual`.
#[derive(Debug)]
struct InvertedResidual {
    expand: Option<ConvBnAct>,
    depthwise: ConvBnAct,
    project: Conv2d,
    project_bn: BatchNorm2d,
    residual: bool,
}

impl InvertedResidual {
    fn new(b: &mut Builder, p: &nn::Path, inp: i64, oup: i64, stride: i64, t: i64) -> Result<Self, TchError> {
        let hidden = inp * t;
        let c = p / "conv";
        let mut i = 0;
        let expand = if t != 1 {
            i += 1;
            Some(ConvBnAct::new(b, &(&c / 0), inp, hidden, 1, 1, 1, Act::Relu6)?)
        } else {
            None
        };
        let depthwise = ConvBnAct::new(b, &(&c / i), hidden, hidden, 3, stride, hidden, Act::Relu6)?;
        let project = Conv2d::build(b, &(&c / (i + 1)), hidden, oup, 1, ConvOpts::same(1))?;
        let project_bn = BatchNorm2d::new(b, &(&c / (i + 2)), oup)?;
        Ok(InvertedResidual { expand, depthwise, project, project_bn, residual: stride == 1 && inp == oup })
    }

    fn forward(&self, x: &Tensor, bn_train: bool) -> Result<Tensor, TchError> {
        let mut y = x.shallow_clone();
        if let Some(e) = &self.expand {
            y = e.forward(&y, bn_train)?;
        }
        y = self.depthwise.forward(&y, bn_train)?;
        y = self.project_bn.forward(&self.project.forward(&y)?, bn_train)?;
        if self.residual { x.f_add(&y) } else { Ok(y) }
    }
}

/// mobilenet_v2 with a new `classifier.1` head.
#[derive(Debug)]
pub(super) struct MobileNetV2 {
    stem: ConvBnAct,
    blocks: Vec<InvertedResidual>,
    last: ConvBnAct,
    head: Linear,
}

impl MobileNetV2 {
    pub(super) fn new(b: &mut Builder, root: &nn::Path, num_classes: i64) -> Result<MobileNetV2, TchError> {
        let fp = root / "features";
        let mut cin = make_divisible(STEM_CHANNELS as f64, 8);
        let stem = ConvBnAct::new(b, &(&fp / 0), 3, cin, 3, 2, 1, Act::Relu6)?;
        let mut blocks = Vec::new();
        for &(t, c, n, s) in &SETTING {
            let cout = make_divisible(c as f64, 8);
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                blocks.push(InvertedResidual::new(b, &(&fp / (blocks.len() + 1)), cin, cout, stride, t)?);
                cin = cout;
            }
        }
        let last_index = blocks.len() + 1;
        debug_assert_eq!(last_index + 1, MOBILENET_V2_FEATURE_MODULES);
        let last = ConvBnAct::new(b, &(&fp / last_index), cin, LAST_CHANNELS, 1, 1, 1, Act::Relu6)?;
        let head = Linear::new_default(b, &(root / "classifier" / 1), LAST_CHANNELS, num_classes)?;
        Ok(MobileNetV2 { stem, blocks, last, head })
    }

    /// Everything before the classifier's dropout: the pooled `[N, 1280]` features.
    pub(super) fn features(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        let bn = mode.bn_train;
        let mut y = self.stem.forward(x, bn)?;
        for block in &self.blocks {
            y = block.forward(&y, bn)?;
        }
        y = self.last.forward(&y, bn)?;
        y.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)
    }

    /// Dropout and the head on [`MobileNetV2::features`].
    pub(super) fn classify(&self, features: &Tensor, mode: ForwardMode, rng: &mut Rng) -> Result<Tensor, TchError> {
        let p = if mode.train { MOBILENET_V2_DROPOUT } else { 0.0 };
        self.head.forward(&dropout(features, p, rng)?)
    }
}
