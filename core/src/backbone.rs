//! The backbones a sweep can name, and what the recipe needs to know about each: which module
//! is the classification head to replace, which modules form the old classifier, and the
//! ordered layer groups (input -> head) that learning-rate strategies assign rates to.
//!
//! Names follow torchvision's `state_dict` exactly, so a parameter belongs to a group when its
//! name is the group's module path or starts with it followed by a dot.

/// A backbone architecture of torchvision's classification zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backbone {
    /// `resnet18` (BasicBlock, 2-2-2-2).
    Resnet18,
    /// `resnet34` (BasicBlock, 3-4-6-3).
    Resnet34,
    /// `resnet50` (Bottleneck, 3-4-6-3).
    Resnet50,
    /// `resnet101` (Bottleneck, 3-4-23-3).
    Resnet101,
    /// `resnet152` (Bottleneck, 3-8-36-3).
    Resnet152,
    /// `vgg16_bn` (configuration "D" with BatchNorm).
    Vgg16Bn,
    /// `efficientnet_b0` (MBConv blocks with squeeze-excitation, SiLU, stochastic depth).
    EfficientnetB0,
    /// `mobilenet_v2` (inverted residuals, ReLU6).
    MobilenetV2,
    /// `densenet121` (DenseNet-BC, growth 32, blocks 6-12-24-16).
    Densenet121,
}

const ALL: [(&str, Backbone); 9] = [
    ("resnet18", Backbone::Resnet18),
    ("resnet34", Backbone::Resnet34),
    ("resnet50", Backbone::Resnet50),
    ("resnet101", Backbone::Resnet101),
    ("resnet152", Backbone::Resnet152),
    ("vgg16_bn", Backbone::Vgg16Bn),
    ("efficientnet_b0", Backbone::EfficientnetB0),
    ("mobilenet_v2", Backbone::MobilenetV2),
    ("densenet121", Backbone::Densenet121),
];

/// Valid backbone names, in a stable order.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|(n, _)| *n).collect()
}

/// Number of modules in vgg16_bn's `features`: 13 × (conv, bn, relu) + 5 max-pools.
pub const VGG16_BN_FEATURE_MODULES: usize = 44;
/// Number of modules in mobilenet_v2's `features`: the stem, 17 inverted residuals, the last
/// 1×1 convolution.
pub const MOBILENET_V2_FEATURE_MODULES: usize = 19;
/// Number of modules in efficientnet_b0's `features`: the stem, 7 stages of MBConv blocks, the
/// last 1×1 convolution.
pub const EFFICIENTNET_B0_FEATURE_MODULES: usize = 9;
/// densenet121's layer groups before the classifier, in `features` order (the parameterless
/// `relu0` and `pool0` are left out).
const DENSENET121_FEATURE_GROUPS: [&str; 10] = [
    "features.conv0",
    "features.norm0",
    "features.denseblock1",
    "features.transition1",
    "features.denseblock2",
    "features.transition2",
    "features.denseblock3",
    "features.transition3",
    "features.denseblock4",
    "features.norm5",
];

impl Backbone {
    /// The backbone called `name` (torchvision's function name: `resnet50`, `vgg16_bn`, …).
    pub fn from_name(name: &str) -> Option<Backbone> {
        ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    /// Every backbone, in the order of [`names`].
    pub fn all() -> impl Iterator<Item = Backbone> {
        ALL.iter().map(|(_, b)| *b)
    }

    /// torchvision's name of the backbone.
    pub fn name(self) -> &'static str {
        ALL.iter().find(|(_, b)| *b == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// Smallest input side the worker accepts for the architecture: every backbone halves its
    /// input five times, so 32 px leaves one value per channel at the last stage (and training
    /// needs batches of at least 2 for BatchNorm).
    pub fn min_image_size(self) -> u32 {
        32
    }

    /// The module replaced by a new, randomly initialised head with the task's classes: the
    /// recipe's `new_layers`.
    pub fn head(self) -> &'static str {
        match self {
            Backbone::Vgg16Bn => "classifier.6",
            Backbone::EfficientnetB0 | Backbone::MobilenetV2 => "classifier.1",
            Backbone::Densenet121 => "classifier",
            Backbone::Resnet18
            | Backbone::Resnet34
            | Backbone::Resnet50
            | Backbone::Resnet101
            | Backbone::Resnet152 => "fc",
        }
    }

    /// The whole old classifier: the recipe's `classifier_layers`.
    pub fn classifier(self) -> &'static str {
        match self {
            Backbone::Vgg16Bn | Backbone::EfficientnetB0 | Backbone::MobilenetV2 | Backbone::Densenet121 => {
                "classifier"
            }
            Backbone::Resnet18
            | Backbone::Resnet34
            | Backbone::Resnet50
            | Backbone::Resnet101
            | Backbone::Resnet152 => "fc",
        }
    }

    /// Layer groups from input to head; the last one is the classifier.
    pub fn layer_groups(self) -> Vec<String> {
        let features = |n: usize| {
            (0..n).map(|i| format!("features.{i}")).chain(std::iter::once("classifier".to_string())).collect()
        };
        match self {
            Backbone::Vgg16Bn => features(VGG16_BN_FEATURE_MODULES),
            Backbone::MobilenetV2 => features(MOBILENET_V2_FEATURE_MODULES),
            Backbone::EfficientnetB0 => features(EFFICIENTNET_B0_FEATURE_MODULES),
            Backbone::Densenet121 => {
                DENSENET121_FEATURE_GROUPS.iter().chain(&["classifier"]).map(|s| s.to_string()).collect()
            }
            Backbone::Resnet18
            | Backbone::Resnet34
            | Backbone::Resnet50
            | Backbone::Resnet101
            | Backbone::Resnet152 => {
                ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"].iter().map(|s| s.to_string()).collect()
            }
        }
    }

    /// Multiply-adds of one forward pass of a 224×224 image, in billions (torchvision's model
    /// table, where they are called GFLOPS); they grow with the image's area.
    pub fn imagenet_gmacs(self) -> f64 {
        match self {
            Backbone::Resnet18 => 1.81,
            Backbone::Resnet34 => 3.66,
            Backbone::Resnet50 => 4.09,
            Backbone::Resnet101 => 7.80,
            Backbone::Resnet152 => 11.51,
            Backbone::Vgg16Bn => 15.47,
            Backbone::EfficientnetB0 => 0.39,
            Backbone::MobilenetV2 => 0.30,
            Backbone::Densenet121 => 2.83,
        }
    }

    /// Parameter count with torchvision's 1000-class ImageNet head (for display before a trial
    /// has reported its own count).
    pub fn imagenet_parameters(self) -> u64 {
        match self {
            Backbone::Resnet18 => 11_689_512,
            Backbone::Resnet34 => 21_797_672,
            Backbone::Resnet50 => 25_557_032,
            Backbone::Resnet101 => 44_549_160,
            Backbone::Resnet152 => 60_192_808,
            Backbone::Vgg16Bn => 138_365_992,
            Backbone::EfficientnetB0 => 5_288_548,
            Backbone::MobilenetV2 => 3_504_872,
            Backbone::Densenet121 => 7_978_856,
        }
    }
}

/// True when parameter `name` lies inside module `module` (`layer1` holds `layer1.0.conv1.weight`
/// but not `layer10.weight`).
pub fn in_module(name: &str, module: &str) -> bool {
    name == module || (name.starts_with(module) && name.as_bytes().get(module.len()) == Some(&b'.'))
}

/// Index of the layer group that holds parameter `name`, if any.
pub fn group_of(groups: &[String], name: &str) -> Option<usize> {
    groups.iter().position(|g| in_module(name, g))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Backbone::all() {
            assert_eq!(Backbone::from_name(b.name()), Some(b));
        }
        assert_eq!(Backbone::from_name("resnet"), None);
    }

    #[test]
    fn groups_end_with_the_classifier() {
        for b in Backbone::all() {
            let g = b.layer_groups();
            assert_eq!(g.last().map(String::as_str), Some(b.classifier()));
            assert!(in_module(b.head(), b.classifier()));
        }
        assert_eq!(Backbone::Vgg16Bn.layer_groups().len(), 45);
        assert_eq!(Backbone::MobilenetV2.layer_groups().len(), 20);
        assert_eq!(Backbone::EfficientnetB0.layer_groups().len(), 10);
        assert_eq!(Backbone::EfficientnetB0.layer_groups()[8], "features.8");
        let d = Backbone::Densenet121.layer_groups();
        assert_eq!(d.len(), 11);
        assert_eq!(
            (d[0].as_str(), d[3].as_str(), d[9].as_str()),
            ("features.conv0", "features.transition1", "features.norm5")
        );
        assert_eq!(Backbone::Densenet121.head(), Backbone::Densenet121.classifier());
    }

    #[test]
    fn module_membership_respects_dots() {
        assert!(in_module("layer1.0.conv1.weight", "layer1"));
        assert!(!in_module("layer10.weight", "layer1"));
        assert!(in_module("features.4.weight", "features.4"));
        assert!(!in_module("features.40.weight", "features.4"));
        let g = Backbone::Resnet50.layer_groups();
        assert_eq!(group_of(&g, "fc.bias"), Some(6));
        assert_eq!(group_of(&g, "bn1.running_mean"), Some(1));
        assert_eq!(group_of(&g, "extra.weight"), None);
        let g = Backbone::MobilenetV2.layer_groups();
        assert_eq!(group_of(&g, "features.1.conv.0.0.weight"), Some(1));
        assert_eq!(group_of(&g, "features.18.1.running_var"), Some(18));
        assert_eq!(group_of(&g, "classifier.1.weight"), Some(19));
        let g = Backbone::Densenet121.layer_groups();
        assert_eq!(group_of(&g, "features.denseblock1.denselayer1.norm1.weight"), Some(2));
        assert_eq!(group_of(&g, "features.denseblock4.denselayer16.conv2.weight"), Some(8));
        assert_eq!(group_of(&g, "classifier.bias"), Some(10));
    }
}
