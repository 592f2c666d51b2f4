//! torchvision's efficientnet_b0 (`torchvision.models.efficientnet_b0`: width and depth 1.0).
//!
//! `features` holds 9 modules: `features.0` the stem `Conv2dNormActivation(3, 32, stride 2)`,
//! `features.1` … `features.7` the seven stages (Sequentials of MBConv blocks,
//! `features.{stage}.{i}`), `features.8` a 1×1 `Conv2dNormActivation` to 1280 channels; every
//! activation is SiLU. An MBConv block's `block` is a Sequential: the 1×1 expansion (absent
//! when the expand ratio is 1, in stage 1), the depthwise `Conv2dNormActivation`, the
//! squeeze-excitation (`fc1`, `fc2`: 1×1 convolutions with bias; SiLU, then a sigmoid gate), and
//! the 1×1 projection without activation. A block whose input and output match adds its input
//! back after stochastic depth ("row" mode, drop probability `0.2 · index / 16` over the 16
//! blocks, active in training only). Then global average pooling and `classifier`:
//! Dropout(0.2) at `classifier.0`, Linear(1280, num_classes) at `classifier.1` (the new head).
//!
//! BatchNorm uses PyTorch's defaults (eps 1e-5, momentum 0.1): torchvision passes
//! `eps=1e-3` (and `momentum=0.01`) only for efficientnet_b5–b7 and the v2 models.

use sweep_core::backbone::EFFICIENTNET_B0_FEATURE_MODULES;
use tch::{TchError, Tensor, nn};

use super::{
    Act, Builder, Conv2d, ConvBnAct, ConvOpts, ForwardMode, Linear, dropout, make_divisible, stochastic_depth,
};
use crate::rng::Rng;

/// Dropout probability of efficientnet_b0's classifier.
pub const EFFICIENTNET_B0_DROPOUT: f64 = 0.2;
/// Drop probability of the last block's stochastic depth (torchvision's
/// `stochastic_depth_prob`); block `i` of `n` uses `i / n` of it.
pub const EFFICIENTNET_STOCHASTIC_DEPTH: f64 = 0.2;

/// torchvision's `MBConvConfig`s for b0: expand ratio, kernel, stride, input channels, output
/// channels, blocks.
const STAGES: [(f64, i64, i64, i64, i64, usize); 7] = [
    (1.0, 3, 1, 32, 16, 1),
    (6.0, 3, 2, 16, 24, 2),
    (6.0, 5, 2, 24, 40, 2),
    (6.0, 3, 2, 40, 80, 3),
    (6.0, 5, 1, 80, 112, 3),
    (6.0, 5, 2, 112, 192, 4),
    (6.0, 3, 1, 192, 320, 1),
];

/// `SqueezeExcitation(channels, squeeze, activation=SiLU)`: `x · sigmoid(fc2(silu(fc1(avgpool(x)))))`.
#[derive(Debug)]
struct SqueezeExcitation {
    fc1: Conv2d,
    fc2: Conv2d,
}

impl SqueezeExcitation {
    fn new(b: &mut Builder, p: &nn::Path, channels: i64, squeeze: i64) -> Result<SqueezeExcitation, TchError> {
        let opts = ConvOpts { bias: true, ..ConvOpts::same(1) };
        let fc1 = Conv2d::build(b, &(p / "fc1"), channels, squeeze, 1, opts)?;
        let fc2 = Conv2d::build(b, &(p / "fc2"), squeeze, channels, 1, opts)?;
        Ok(SqueezeExcitation { fc1, fc2 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let s = x.f_adaptive_avg_pool2d([1, 1])?;
        let s = self.fc2.forward(&self.fc1.forward(&s)?.f_silu()?)?.f_sigmoid()?;
        s.f_mul(x)
    }
}

/// `MBConv`.
#[derive(Debug)]
struct MbConv {
    expand: Option<ConvBnAct>,
    depthwise: ConvBnAct,
    se: SqueezeExcitation,
    project: ConvBnAct,
    residual: bool,
    /// Stochastic-depth drop probability.
    drop: f64,
}

impl MbConv {
    #[allow(clippy::too_many_arguments)]
    fn new(
        b: &mut Builder,
        p: &nn::Path,
        expand_ratio: f64,
        kernel: i64,
        stride: i64,
        cin: i64,
        cout: i64,
        drop: f64,
    ) -> Result<MbConv, TchError> {
        let bp = p / "block";
        let expanded = make_divisible(cin as f64 * expand_ratio, 8);
        let mut i = 0;
        let expand = if expanded != cin {
            i += 1;
            Some(ConvBnAct::new(b, &(&bp / 0), cin, expanded, 1, 1, 1, Act::Silu)?)
        } else {
            None
        };
        let depthwise = ConvBnAct::new(b, &(&bp / i), expanded, expanded, kernel, stride, expanded, Act::Silu)?;
        let se = SqueezeExcitation::new(b, &(&bp / (i + 1)), expanded, (cin / 4).max(1))?;
        let project = ConvBnAct::new(b, &(&bp / (i + 2)), expanded, cout, 1, 1, 1, Act::None)?;
        Ok(MbConv { expand, depthwise, se, project, residual: stride == 1 && cin == cout, drop })
    }

    fn forward(&self, x: &Tensor, mode: ForwardMode, rng: &mut Rng) -> Result<Tensor, TchError> {
        let bn = mode.bn_train;
        let mut y = x.shallow_clone();
        if let Some(e) = &self.expand {
            y = e.forward(&y, bn)?;
        }
        y = self.depthwise.forward(&y, bn)?;
        y = self.se.forward(&y)?;
        y = self.project.forward(&y, bn)?;
        if !self.residual {
            return Ok(y);
        }
        if mode.train {
            y = stochastic_depth(&y, self.drop, rng)?;
        }
        y.f_add(x)
    }
}

/// efficientnet_b0 with a new `classifier.1` head.
#[derive(Debug)]
pub(super) struct EfficientNetB0 {
    stem: ConvBnAct,
    stages: Vec<Vec<MbConv>>,
    last: ConvBnAct,
    head: Linear,
}

impl EfficientNetB0 {
    pub(super) fn new(b: &mut Builder, root: &nn::Path, num_classes: i64) -> Result<EfficientNetB0, TchError> {
        let fp = root / "features";
        let stem = ConvBnAct::new(b, &(&fp / 0), 3, STAGES[0].3, 3, 2, 1, Act::Silu)?;
        let total: usize = STAGES.iter().map(|s| s.5).sum();
        let mut index = 0;
        let mut stages = Vec::with_capacity(STAGES.len());
        for (s, &(ratio, kernel, stride, cin, cout, n)) in STAGES.iter().enumerate() {
            let sp = &fp / (s + 1);
            let mut stage = Vec::with_capacity(n);
            for i in 0..n {
                let (cin, stride) = if i == 0 { (cin, stride) } else { (cout, 1) };
                let drop = EFFICIENTNET_STOCHASTIC_DEPTH * index as f64 / total as f64;
                stage.push(MbConv::new(b, &(&sp / i), ratio, kernel, stride, cin, cout, drop)?);
                index += 1;
            }
            stages.push(stage);
        }
        let last_index = STAGES.len() + 1;
        debug_assert_eq!(last_index + 1, EFFICIENTNET_B0_FEATURE_MODULES);
        let cin = STAGES[STAGES.len() - 1].4;
        let last = ConvBnAct::new(b, &(&fp / last_index), cin, 4 * cin, 1, 1, 1, Act::Silu)?;
        let head = Linear::new_default(b, &(root / "classifier" / 1), 4 * cin, num_classes)?;
        Ok(EfficientNetB0 { stem, stages, last, head })
    }

    /// Everything before the classifier's dropout: the pooled `[N, 1280]` features. In
    /// training mode stochastic depth draws from `rng` here, so these are not a function of
    /// the input alone.
    pub(super) fn features(&self, x: &Tensor, mode: ForwardMode, rng: &mut Rng) -> Result<Tensor, TchError> {
        let mut y = self.stem.forward(x, mode.bn_train)?;
        for stage in &self.stages {
            for block in stage {
                y = block.forward(&y, mode, rng)?;
            }
        }
        y = self.last.forward(&y, mode.bn_train)?;
        y.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)
    }

    /// Dropout and the head on [`EfficientNetB0::features`].
    pub(super) fn classify(&self, features: &Tensor, mode: ForwardMode, rng: &mut Rng) -> Result<Tensor, TchError> {
        let p = if mode.train { EFFICIENTNET_B0_DROPOUT } else { 0.0 };
        self.head.forward(&dropout(features, p, rng)?)
    }
}
