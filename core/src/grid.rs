//! Grid expansion: the cross product backbone × lr_decay × epoch_split, in a fixed order
//! (backbone slowest, epoch split fastest), with stable trial ids.

use crate::backbone::Backbone;
use crate::lr::LrDecay;
use crate::spec::GridSpec;

/// One cell of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// Position in the expansion order (0-based).
    pub index: usize,
    /// Stable id within the sweep: `t000`, `t001`, …
    pub id: String,
    pub backbone: Backbone,
    pub lr_decay: LrDecay,
    pub fe_epochs: u32,
    pub ft_epochs: u32,
}

impl Trial {
    pub fn epochs(&self) -> u32 {
        self.fe_epochs + self.ft_epochs
    }

    /// `16+8`: feature-extraction epochs + fine-tuning epochs.
    pub fn split_label(&self) -> String {
        format!("{}+{}", self.fe_epochs, self.ft_epochs)
    }
}

/// The id of the trial at `index`.
pub fn trial_id(index: usize) -> String {
    format!("t{index:03}")
}

/// Parses a trial id back to its index.
pub fn trial_index(id: &str) -> Option<usize> {
    let digits = id.strip_prefix('t')?;
    if digits.len() < 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `id` has the shape of a sweep id: 1 to 64 characters of `a-z`, `0-9` and `-`,
/// starting with a letter or digit (`quickstart-6b7c`). Ids become parts of paths and object
/// keys on workers, so one that comes off the wire is checked with this before any use.
pub fn is_sweep_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

/// Trial `index` of the grid, as [`expand`] would give it, without expanding the rest (a grid
/// from the wire may be very large).
pub fn cell(grid: &GridSpec, index: usize) -> Option<Trial> {
    let (l, e) = (grid.lr_decay.len(), grid.epoch_split.len());
    let per_backbone = l.checked_mul(e)?;
    if per_backbone == 0 {
        return None;
    }
    let backbone = *grid.backbone.get(index / per_backbone)?;
    let lr_decay = grid.lr_decay[(index % per_backbone) / e];
    let (fe_epochs, ft_epochs) = grid.epoch_split[index % e];
    Some(Trial { index, id: trial_id(index), backbone, lr_decay, fe_epochs, ft_epochs })
}

/// Expands the grid. The same grid always gives the same trials, ids and order.
pub fn expand(grid: &GridSpec) -> Vec<Trial> {
    let mut trials = Vec::with_capacity(grid.trial_count());
    for &backbone in &grid.backbone {
        for &lr_decay in &grid.lr_decay {
            for &(fe_epochs, ft_epochs) in &grid.epoch_split {
                let index = trials.len();
                trials.push(Trial { index, id: trial_id(index), backbone, lr_decay, fe_epochs, ft_epochs });
            }
        }
    }
    trials
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cell_is_the_cell_expand_gives() {
        let spec = crate::spec::parse(
            "name: g\ndataset: { kind: synthetic }\ngrid:\n  backbone: [resnet18, resnet50, vgg16_bn]\n  \
             lr_decay: [{ strategy: linear }, { strategy: exponential }]\n  epoch_split: [[1, 2], [2, 1], [3, 3]]\n",
        )
        .unwrap();
        let all = expand(&spec.grid);
        for (i, t) in all.iter().enumerate() {
            assert_eq!(cell(&spec.grid, i).as_ref(), Some(t));
        }
        assert_eq!(cell(&spec.grid, all.len()), None);
        assert_eq!(cell(&spec.grid, usize::MAX), None);
    }

    #[test]
    fn ids_that_could_be_paths_are_not_ids() {
        for good in ["quickstart-6b7c", "sweep-12", "a"] {
            assert!(is_sweep_id(good), "{good}");
        }
        for bad in ["", "../../etc", "a/b", "-x", "UPPER", "a b", ".", "..", &"a".repeat(65), "x\u{0}"] {
            assert!(!is_sweep_id(bad), "{bad:?}");
        }
        assert_eq!(trial_index("t003"), Some(3));
        for bad in ["t03", "../t003", "t003/..", "t00a", "x003", "t0003\n"] {
            assert_eq!(trial_index(bad), None, "{bad:?}");
        }
    }

    fn grid() -> GridSpec {
        GridSpec {
            backbone: vec![Backbone::Vgg16Bn, Backbone::Resnet50],
            lr_decay: vec![
                LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 },
                LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 },
            ],
            epoch_split: vec![(16, 8), (12, 12), (8, 16)],
        }
    }

    #[test]
    fn cross_product_in_fixed_order() {
        let t = expand(&grid());
        assert_eq!(t.len(), 12);
        assert_eq!(t[0].id, "t000");
        assert_eq!((t[0].backbone, t[0].fe_epochs, t[0].ft_epochs), (Backbone::Vgg16Bn, 16, 8));
        assert_eq!((t[1].fe_epochs, t[1].ft_epochs), (12, 12));
        assert_eq!(t[3].lr_decay.strategy(), "exponential");
        assert_eq!(t[6].backbone, Backbone::Resnet50);
        assert_eq!(t[11].id, "t011");
        assert_eq!(t[11].split_label(), "8+16");
        for (i, trial) in t.iter().enumerate() {
            assert_eq!(trial.index, i);
            assert_eq!(trial_index(&trial.id), Some(i));
        }
    }

    #[test]
    fn expansion_is_deterministic() {
        assert_eq!(expand(&grid()), expand(&grid()));
    }

    #[test]
    fn trial_ids_parse() {
        assert_eq!(trial_index("t000"), Some(0));
        assert_eq!(trial_index("t1234"), Some(1234));
        assert_eq!(trial_index("t12"), None);
        assert_eq!(trial_index("x001"), None);
        assert_eq!(trial_index("t-01"), None);
    }
}
