//! torchvision's vgg16_bn (`torchvision.models.vgg16_bn`, configuration "D" with BatchNorm).
//!
//! `features` holds 44 modules: 13 × (Conv2d 3×3 with bias, BatchNorm2d, ReLU) and 5 MaxPool2d,
//! numbered `features.0` … `features.43` as in torchvision (ReLUs and pools own no tensors but
//! take an index). Then AdaptiveAvgPool2d((7, 7)) — so any input of at least 32 px works — and
//! `classifier`: Linear(25088, 4096) ReLU Dropout(0.5) Linear(4096, 4096) ReLU Dropout(0.5)
//! Linear(4096, num_classes) at `classifier.0`, `.3` and `.6` (the new head).

use sweep_core::backbone::VGG16_BN_FEATURE_MODULES;
use tch::{TchError, Tensor, nn};

use super::{BatchNorm2d, Builder, Conv2d, ForwardMode, Linear, VGG_DROPOUT, dropout};
use crate::rng::Rng;

/// Configuration "D": output channels of each 3×3 convolution, 0 for a max-pool.
const CFG_D: [i64; 18] = [64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0];

#[derive(Debug)]
enum Feature {
    Conv(Conv2d),
    Bn(BatchNorm2d),
    Relu,
    MaxPool,
}

/// vgg16_bn with a new `classifier.6` head.
#[derive(Debug)]
pub(super) struct Vgg {
    features: Vec<Feature>,
    fc0: Linear,
    fc3: Linear,
    fc6: Linear,
}

impl Vgg {
    pub(super) fn new(b: &mut Builder, root: &nn::Path, num_classes: i64) -> Result<Vgg, TchError> {
        let fp = root / "features";
        let mut features = Vec::with_capacity(VGG16_BN_FEATURE_MODULES);
        let mut cin = 3;
        for &c in &CFG_D {
            if c == 0 {
                features.push(Feature::MaxPool);
                continue;
            }
            let i = features.len();
            features.push(Feature::Conv(Conv2d::new(b, &(&fp / i), cin, c, 3, 1, 1, true)?));
            features.push(Feature::Bn(BatchNorm2d::new(b, &(&fp / (i + 1)), c)?));
            features.push(Feature::Relu);
            cin = c;
        }
        debug_assert_eq!(features.len(), VGG16_BN_FEATURE_MODULES);
        let cp = root / "classifier";
        let fc0 = Linear::new_normal(b, &(&cp / 0), 512 * 7 * 7, 4096, 0.01)?;
        let fc3 = Linear::new_normal(b, &(&cp / 3), 4096, 4096, 0.01)?;
        let fc6 = Linear::new_default(b, &(&cp / 6), 4096, num_classes)?;
        Ok(Vgg { features, fc0, fc3, fc6 })
    }

    /// The convolutional part, pooled and flattened: `[N, 25088]`. (`classifier.0` is left to
    /// [`Vgg::classify`]: a matrix product's rows depend on their position in the batch on the
    /// CPU, a convolution's do not, and cached features must not depend on it.)
    pub(super) fn features(&self, x: &Tensor, mode: ForwardMode) -> Result<Tensor, TchError> {
        let mut y = x.shallow_clone();
        for f in &self.features {
            y = match f {
                Feature::Conv(c) => c.forward(&y)?,
                Feature::Bn(bn) => bn.forward(&y, mode.bn_train)?,
                Feature::Relu => y.f_relu()?,
                Feature::MaxPool => y.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?,
            };
        }
        y.f_adaptive_avg_pool2d([7, 7])?.f_flatten(1, -1)
    }

    /// The classifier on [`Vgg::features`]: `classifier.0`, ReLU, dropout, `classifier.3`,
    /// ReLU, dropout, the head.
    pub(super) fn classify(&self, features: &Tensor, mode: ForwardMode, rng: &mut Rng) -> Result<Tensor, TchError> {
        let p = if mode.train { VGG_DROPOUT } else { 0.0 };
        let y = dropout(&self.fc0.forward(features)?.f_relu()?, p, rng)?;
        let y = dropout(&self.fc3.forward(&y)?.f_relu()?, p, rng)?;
        self.fc6.forward(&y)
    }
}
