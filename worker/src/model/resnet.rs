//! torchvision's ResNets (`torchvision.models.resnet`): BasicBlock for resnet18/34, Bottleneck
//! (ResNet v1.5: the stride sits on the 3×3 convolution) for resnet50/101/152.
//!
//! Module names: `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
//! `layer{k}.0.downsample.{0,1}` where the block changes stride or width, `fc`.

use sweep_core::Backbone;
use tch::{TchError, Tensor, nn};

use super::{BatchNorm2d, Builder, Conv2d, ForwardMode, Linear};

/// Residual block kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Basic,
    Bottleneck,
}

impl Kind {
    fn expansion(self) -> i64 {
        match self {
            Kind::Basic => 1,
            Kind::Bottleneck => 4,
        }
    }
}

/// Block kind and blocks per stage of each ResNet depth.
fn config(backbone: Backbone) -> Option<(Kind, [usize; 4])> {
    Some(match backbone {
        Backbone::Resnet18 => (Kind::Basic, [2, 2, 2, 2]),
        Backbone::Resnet34 => (Kind::Basic, [3, 4, 6, 3]),
        Backbone::Resnet50 => (Kind::Bottleneck, [3, 4, 6, 3]),
        Backbone::Resnet101 => (Kind::Bottleneck, [3, 4, 23, 3]),
        Backbone::Resnet152 => (Kind::Bottleneck, [3, 8, 36, 3]),
        Backbone::Vgg16Bn | Backbone::EfficientnetB0 | Backbone::MobilenetV2 | Backbone::Densenet121 => return None,
    })
}

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    /// Bottleneck only.
    conv3: Option<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    fn new(
        b: &mut Builder,
        p: &nn::Path,
        kind: Kind,
        inplanes: i64,
        planes: i64,
        stride: i64,
    ) -> Result<Block, TchError> {
        let out = planes * kind.expansion();
        let (conv1, bn1, conv2, bn2, conv3) = match kind {
            Kind::Basic => {
                let conv1 = Conv2d::new(b, &(p / "conv1"), inplanes, planes, 3, stride, 1, false)?;
                let bn1 = BatchNorm2d::new(b, &(p / "bn1"), planes)?;
                let conv2 = Conv2d::new(b, &(p / "conv2"), planes, planes, 3, 1, 1, false)?;
                let bn2 = BatchNorm2d::new(b, &(p / "bn2"), planes)?;
                (conv1, bn1, conv2, bn2, None)
            }
            Kind::Bottleneck => {
                let conv1 = Conv2d::new(b, &(p / "conv1"), inplanes, planes, 1, 1, 0, false)?;
                let bn1 = BatchNorm2d::new(b, &(p / "bn1"), planes)?;
                let conv2 = Conv2d::new(b, &(p / "conv2"), planes, planes, 3, stride, 1, false)?;
                let bn2 = BatchNorm2d::new(b, &(p / "bn2"), planes)?;
                let conv3 = Conv2d::new(b, &(p / "conv3"), planes, out, 1, 1, 0, false)?;
                let bn3 = BatchNorm2d::new(b, &(p / "bn3"), out)?;
                (conv1, bn1, conv2, bn2, Some((conv3, bn3)))
            }
        };
        let downsample = if stride != 1 || inplanes != out {
            let d = p / "downsample";
            let conv = Conv2d::new(b, &(&d / "0"), inplanes, out, 1, stride, 0, false)?;
            let bn = BatchNorm2d::new(b, &(&d / "1"), out)?;
            Some((conv, bn))
        } else {
            None
        };
        Ok(Block { conv1, bn1, conv2, bn2, conv3, downsample })
    }

    fn forward(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        let bn = mode.bn_train;
        let mut y = self.bn1.forward(&self.conv1.forward(x)?, bn)?.f_relu()?;
        y = self.bn2.forward(&self.conv2.forward(&y)?, bn)?;
        if let Some((conv3, bn3)) = &self.conv3 {
            y = bn3.forward(&conv3.forward(&y.f_relu()?)?, bn)?;
        }
        let identity = match &self.downsample {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?, bn)?,
            None => x.shallow_clone(),
        };
        y.f_add(&identity)?.f_relu()
    }
}

/// A torchvision ResNet with a new `fc` head.
#[derive(Debug)]
pub(super) struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<Block>>,
    fc: Linear,
}

impl ResNet {
    pub(super) fn new(
        b: &mut Builder,
        root: &nn::Path,
        backbone: Backbone,
        num_classes: i64,
    ) -> Result<ResNet, TchError> {
        let (kind, blocks) =
            config(backbone).ok_or_else(|| TchError::Kind(format!("{} is not a ResNet", backbone.name())))?;
        let conv1 = Conv2d::new(b, &(root / "conv1"), 3, 64, 7, 2, 3, false)?;
        let bn1 = BatchNorm2d::new(b, &(root / "bn1"), 64)?;
        let mut inplanes = 64;
        let mut layers = Vec::with_capacity(4);
        for (stage, &n) in blocks.iter().enumerate() {
            let planes = 64 << stage;
            let stride = if stage == 0 { 1 } else { 2 };
            let lp = root / format!("layer{}", stage + 1);
            let mut layer = Vec::with_capacity(n);
            for i in 0..n {
                let s = if i == 0 { stride } else { 1 };
                layer.push(Block::new(b, &(&lp / i), kind, inplanes, planes, s)?);
                inplanes = planes * kind.expansion();
            }
            layers.push(layer);
        }
        let fc = Linear::new_default(b, &(root / "fc"), inplanes, num_classes)?;
        Ok(ResNet { conv1, bn1, layers, fc })
    }

    /// Everything before `fc`: the pooled `[N, C]` features.
    pub(super) fn features(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        let mut y = self.bn1.forward(&self.conv1.forward(x)?, mode.bn_train)?.f_relu()?;
        y = y.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?;
        for layer in &self.layers {
            for block in layer {
                y = block.forward(&y, mode)?;
            }
        }
        y.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)
    }

    /// The head on [`ResNet::features`].
    pub(super) fn classify(&self, features: &Tensor) -> Result<Tensor, TchError> {
        self.fc.forward(features)
    }
}
