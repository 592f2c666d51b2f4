//! The backbones a sweep can name, and what the recipe needs to know about each: which module
//! is the classification head to replace, which modules form the old classifier, and the
//! ordered layer groups (input -> head) that learning-rate strategies assign rates to.
//!
//! Names follow torchvision's `state_dict` exactly, so a parameter belongs to a group when its
//! name is the group's module path or starts with it followed by a dot.

/// A backbone architecture of torchvision's classification zoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backbone {
    Resnet18,
    Resnet34,
    Resnet50,
    Resnet101,
    Resnet152,
    Vgg16Bn,
}

const ALL: [(&str, Backbone); 6] = [
    ("resnet18", Backbone::Resnet18),
    ("resnet34", Backbone::Resnet34),
    ("resnet50", Backbone::Resnet50),
    ("resnet101", Backbone::Resnet101),
    ("resnet152", Backbone::Resnet152),
    ("vgg16_bn", Backbone::Vgg16Bn),
];

/// Valid backbone names, in a stable order.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|(n, _)| *n).collect()
}

/// Number of modules in vgg16_bn's `features`: 13 × (conv, bn, relu) + 5 max-pools.
pub const VGG16_BN_FEATURE_MODULES: usize = 44;

impl Backbone {
    pub fn from_name(name: &str) -> Option<Backbone> {
        ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    pub fn all() -> impl Iterator<Item = Backbone> {
        ALL.iter().map(|(_, b)| *b)
    }

    pub fn name(self) -> &'static str {
        ALL.iter().find(|(_, b)| *b == self).map(|(n, _)| *n).unwrap_or("?")
    }

    /// Smallest input side the architecture takes (five stride-2 stages).
    pub fn min_image_size(self) -> u32 {
        32
    }

    /// The module replaced by a new, randomly initialised head with the task's classes: the
    /// recipe's `new_layers`.
    pub fn head(self) -> &'static str {
        match self {
            Backbone::Vgg16Bn => "classifier.6",
            _ => "fc",
        }
    }

    /// The whole old classifier: the recipe's `classifier_layers`.
    pub fn classifier(self) -> &'static str {
        match self {
            Backbone::Vgg16Bn => "classifier",
            _ => "fc",
        }
    }

    /// Layer groups from input to head; the last one is the classifier.
    pub fn layer_groups(self) -> Vec<String> {
        match self {
            Backbone::Vgg16Bn => (0..VGG16_BN_FEATURE_MODULES)
                .map(|i| format!("features.{i}"))
                .chain(std::iter::once("classifier".to_string()))
                .collect(),
            _ => ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"].iter().map(|s| s.to_string()).collect(),
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
    }
}
