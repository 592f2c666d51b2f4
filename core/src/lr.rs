//! Learning-rate decay strategies for fine-tuning: pure functions from a backbone's ordered
//! layer groups to one learning rate per group.
//!
//! Groups are ordered from the input to the head; the last group is the head (the whole old
//! classifier, which holds the new layers). Parameters in no group use the fine-tuning
//! `default_lr` of the spec.

use std::fmt;

/// How learning rates fall from the head towards the input during fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrDecay {
    /// The head gets `head_lr`; the `n` groups below it fall linearly so that the group next to
    /// the head gets `head_lr + step` and the first group (the input) gets `final_lr`, with
    /// `step = (final_lr - head_lr) / n`. (The recipe's vgg16_bn schedule: 1e-4 -> 1e-7 over
    /// `features[43]` .. `features[0]`.)
    Linear { head_lr: f64, final_lr: f64 },
    /// Walking from the head towards the input, the learning rate starts at `head_lr` and is
    /// divided by `factor` at each group. (The recipe's resnet schedule, factor 3.)
    Exponential { head_lr: f64, factor: f64 },
}

impl LrDecay {
    pub fn strategy(&self) -> &'static str {
        match self {
            LrDecay::Linear { .. } => "linear",
            LrDecay::Exponential { .. } => "exponential",
        }
    }

    pub fn head_lr(&self) -> f64 {
        match *self {
            LrDecay::Linear { head_lr, .. } | LrDecay::Exponential { head_lr, .. } => head_lr,
        }
    }

    /// One learning rate per group, for `groups` groups ordered input -> head (last = head).
    pub fn group_lrs(&self, groups: usize) -> Vec<f64> {
        if groups == 0 {
            return Vec::new();
        }
        let below = groups - 1; // groups below the head
        match *self {
            LrDecay::Linear { head_lr, final_lr } => {
                let step = if below == 0 { 0.0 } else { (final_lr - head_lr) / below as f64 };
                (0..groups).map(|i| if i == below { head_lr } else { head_lr + step * (below - i) as f64 }).collect()
            }
            LrDecay::Exponential { head_lr, factor } => {
                (0..groups).map(|i| head_lr / factor.powi((below - i) as i32)).collect()
            }
        }
    }
}

/// A short, stable label: `linear(1e-4→1e-7)`, `exponential(1e-4/3)`.
impl fmt::Display for LrDecay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LrDecay::Linear { head_lr, final_lr } => write!(f, "linear({head_lr:e}→{final_lr:e})"),
            LrDecay::Exponential { head_lr, factor } => write!(f, "exponential({head_lr:e}/{factor})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        ((a - b) / b).abs() < 1e-9
    }

    #[test]
    fn linear_matches_the_recipe_for_vgg16_bn() {
        // 44 feature modules + the classifier.
        let lrs = LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 }.group_lrs(45);
        let step = (1e-7 - 1e-4) / 44.0;
        assert_eq!(lrs[44], 1e-4, "classifier");
        for (i, lr) in lrs.iter().enumerate().take(44) {
            assert!(close(*lr, 1e-4 + step * (44 - i) as f64), "features[{i}]");
        }
        assert!(close(lrs[43], 9.772_954_545_454_5e-5), "features[43] = {}", lrs[43]);
        assert!(close(lrs[0], 1e-7), "features[0] = {}", lrs[0]);
    }

    #[test]
    fn exponential_matches_the_recipe_for_resnet() {
        // conv1, bn1, layer1, layer2, layer3, layer4, fc
        let lrs = LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 }.group_lrs(7);
        let want = [1.3717421e-7, 4.1152263e-7, 1.2345679e-6, 3.7037037e-6, 1.1111111e-5, 3.3333333e-5, 1e-4];
        for (got, want) in lrs.iter().zip(want) {
            assert!((got - want).abs() / want < 1e-7, "{got} vs {want}");
        }
    }

    #[test]
    fn single_group_is_the_head() {
        assert_eq!(LrDecay::Linear { head_lr: 1e-3, final_lr: 1e-6 }.group_lrs(1), vec![1e-3]);
        assert_eq!(LrDecay::Exponential { head_lr: 1e-3, factor: 10.0 }.group_lrs(1), vec![1e-3]);
        assert!(LrDecay::Exponential { head_lr: 1e-3, factor: 10.0 }.group_lrs(0).is_empty());
    }

    #[test]
    fn labels() {
        assert_eq!(LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 }.to_string(), "linear(1e-4→1e-7)");
        assert_eq!(LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 }.to_string(), "exponential(1e-4/3)");
    }
}
