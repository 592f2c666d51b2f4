//! The stage tree: the epochs a sweep's trials share, computed once.
//!
//! A trial is a sequence of epochs. What an epoch computes is fixed by its backbone, the data,
//! the starting weights (or pretraining), the training settings (batch size, optimizer, weight
//! decay, seed, augmentation, BatchNorm freezing, data-parallel replicas), its global number —
//! every epoch's randomness derives from `(seed, epoch)` — and its phase with that phase's
//! learning rates: feature extraction trains the new head at `training.feature_extraction_lr`
//! whatever the strategy, fine-tuning uses the strategy's per-layer rates. So trial `[8, 16]`'s
//! feature extraction is exactly the first 8 epochs of trial `[16, 8]`'s, for either strategy.
//!
//! The trials form a trie over their epoch sequences; a [`Stage`] is one of its nodes: a run of
//! epochs of one kind that the same trials pass through. A child stage starts from its parent's
//! end state (a resume point). A stage's [`StageKey`] is the SHA-256 of everything that defines
//! its epochs from the first one — the backbone's settings and the run-length sequence of epoch
//! kinds — so it is the same in every sweep whose tree holds those epochs, however the trees
//! are cut into stages.
//!
//! [`TRAINING_VERSION`] is part of every key: a change to what an epoch computes (the training
//! loop, augmentation, initialisation) must raise it, so that no stage computed before the
//! change is taken for one computed after it.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

use crate::backbone::Backbone;
use crate::batching;
use crate::grid::{self, Trial};
use crate::leaderboard::Phase;
use crate::lr::LrDecay;
use crate::spec::{DatasetSpec, PretrainSpec, SweepSpec, Weights};

/// The version of what an epoch computes, in every stage key. Raise it with any change to the
/// training that changes an epoch's result. History: 1, the first; 2, CPU training batches from
/// the fused augmentation kernel (`sweep_worker::augment::cpu`), which rounds differently from
/// the tensor operations before it.
pub const TRAINING_VERSION: u32 = 2;

/// What one epoch computes beyond what every epoch of its backbone's trials shares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EpochKind {
    /// The backbone frozen, the new head trained at `training.feature_extraction_lr`.
    FeatureExtraction,
    /// Every layer trained with the strategy's per-layer learning rates.
    FineTuning(LrDecay),
}

impl EpochKind {
    /// The kind of global epoch `epoch` (1-based) of `trial`.
    pub fn of(trial: &Trial, epoch: u32) -> EpochKind {
        if epoch <= trial.fe_epochs { EpochKind::FeatureExtraction } else { EpochKind::FineTuning(trial.lr_decay) }
    }

    pub fn is_feature_extraction(&self) -> bool {
        matches!(self, EpochKind::FeatureExtraction)
    }

    /// The trial phase epochs of this kind belong to.
    pub fn phase(&self) -> Phase {
        if self.is_feature_extraction() { Phase::FeatureExtraction } else { Phase::FineTuning }
    }

    /// Its exact form in a stage key (floats by their bits).
    fn canonical(&self, spec: &SweepSpec) -> String {
        match self {
            EpochKind::FeatureExtraction => {
                let t = &spec.training;
                // Unaugmented feature extraction is another computation — unless nothing was
                // augmented anyway (then the key stays what it was before the setting existed).
                let plain = t.augment_in(Phase::FeatureExtraction);
                let augment = if plain != t.augment { " augment=none" } else { "" };
                format!("fe lr={}{augment}", bits(t.feature_extraction_lr))
            }
            EpochKind::FineTuning(d) => {
                let default = bits(spec.training.fine_tuning_default_lr);
                match *d {
                    LrDecay::Linear { head_lr, final_lr } => {
                        format!("ft default={default} linear head={} final={}", bits(head_lr), bits(final_lr))
                    }
                    LrDecay::Exponential { head_lr, factor } => {
                        format!("ft default={default} exponential head={} factor={}", bits(head_lr), bits(factor))
                    }
                }
            }
        }
    }
}

impl std::fmt::Display for EpochKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EpochKind::FeatureExtraction => f.write_str("feature extraction"),
            EpochKind::FineTuning(d) => write!(f, "fine-tuning {d}"),
        }
    }
}

/// A stage's content address: 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StageKey(pub String);

impl std::fmt::Display for StageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node of the tree: epochs `first_epoch..=last_epoch` of one kind, computed once for every
/// trial in `trials`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    /// Its position in [`StageTree::stages`]; parents come before their children.
    pub index: usize,
    pub parent: Option<usize>,
    pub children: Vec<usize>,
    pub backbone: Backbone,
    pub kind: EpochKind,
    /// Global, 1-based, inclusive.
    pub first_epoch: u32,
    pub last_epoch: u32,
    /// Grid indexes of the trials that pass through it, in grid order.
    pub trials: Vec<usize>,
    /// Those of `trials` whose last epoch is this stage's last.
    pub ends: Vec<usize>,
    pub key: StageKey,
}

impl Stage {
    pub fn epochs(&self) -> u32 {
        self.last_epoch + 1 - self.first_epoch
    }

    /// A stage id for display: `s00`, `s01`, …
    pub fn id(&self) -> String {
        format!("s{:02}", self.index)
    }
}

/// A run of a trial's epochs that other trials share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    pub first_epoch: u32,
    pub last_epoch: u32,
    /// Grid indexes of the other trials through those epochs.
    pub with: Vec<usize>,
}

/// The stages of a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct StageTree {
    pub trials: Vec<Trial>,
    pub stages: Vec<Stage>,
    /// Stages without a parent (one per backbone when sharing), in grid order.
    pub roots: Vec<usize>,
    /// The stage each trial ends in, by grid index.
    ending: Vec<usize>,
}

/// Epoch counts by phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Epochs {
    pub feature_extraction: u64,
    pub fine_tuning: u64,
}

impl Epochs {
    pub fn total(&self) -> u64 {
        self.feature_extraction + self.fine_tuning
    }
}

impl StageTree {
    /// The tree of `spec`'s trials: shared prefixes are one stage when `sharing`, and every
    /// trial is its own chain (one stage per phase) when not.
    pub fn build(spec: &SweepSpec, sharing: bool) -> StageTree {
        let trials = grid::expand(&spec.grid);
        let mut tree = StageTree { trials: Vec::new(), stages: Vec::new(), roots: Vec::new(), ending: Vec::new() };
        let groups: Vec<Vec<usize>> = if sharing {
            let mut by_backbone: Vec<(Backbone, Vec<usize>)> = Vec::new();
            for t in &trials {
                match by_backbone.iter_mut().find(|(b, _)| *b == t.backbone) {
                    Some((_, members)) => members.push(t.index),
                    None => by_backbone.push((t.backbone, vec![t.index])),
                }
            }
            by_backbone.into_iter().map(|(_, members)| members).collect()
        } else {
            trials.iter().map(|t| vec![t.index]).collect()
        };
        tree.trials = trials;
        for members in groups {
            let base = base_key(spec, tree.trials[members[0]].backbone);
            tree.grow(spec, &base, None, &members, 0, &[]);
        }
        tree.ending = vec![usize::MAX; tree.trials.len()];
        for s in &tree.stages {
            for &t in &s.ends {
                tree.ending[t] = s.index;
            }
        }
        tree
    }

    /// Adds the stages after epoch `done` of `members` (trials that share epochs `1..=done`, with
    /// run-length epoch kinds `prefix`, and have not ended), under `parent`.
    fn grow(
        &mut self,
        spec: &SweepSpec,
        base: &str,
        parent: Option<usize>,
        members: &[usize],
        done: u32,
        prefix: &[(String, u32)],
    ) {
        // Group by the next epoch's kind, in grid order of each group's first trial.
        let mut groups: Vec<(EpochKind, Vec<usize>)> = Vec::new();
        for &i in members {
            let kind = EpochKind::of(&self.trials[i], done + 1);
            match groups.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, g)) => g.push(i),
                None => groups.push((kind, vec![i])),
            }
        }
        for (kind, group) in groups {
            // The stage runs while every trial of the group goes on with epochs of this kind.
            let len = group.iter().map(|&i| run_left(&self.trials[i], done)).min().unwrap_or(0);
            let last = done + len;
            let mut path = prefix.to_vec();
            let canonical = kind.canonical(spec);
            match path.last_mut() {
                Some((k, n)) if *k == canonical => *n += len,
                _ => path.push((canonical, len)),
            }
            let index = self.stages.len();
            let (ends, going_on): (Vec<usize>, Vec<usize>) =
                group.iter().partition(|&&i| self.trials[i].epochs() == last);
            self.stages.push(Stage {
                index,
                parent,
                children: Vec::new(),
                backbone: self.trials[group[0]].backbone,
                kind,
                first_epoch: done + 1,
                last_epoch: last,
                trials: group.clone(),
                ends,
                key: stage_key(base, &path),
            });
            match parent {
                Some(p) => self.stages[p].children.push(index),
                None => self.roots.push(index),
            }
            if !going_on.is_empty() {
                self.grow(spec, base, Some(index), &going_on, last, &path);
            }
        }
    }

    /// Epochs every trial runs on its own (no sharing), by phase.
    pub fn naive_epochs(&self) -> Epochs {
        let mut e = Epochs::default();
        for t in &self.trials {
            e.feature_extraction += u64::from(t.fe_epochs);
            e.fine_tuning += u64::from(t.ft_epochs);
        }
        e
    }

    /// Epochs the stages run, by phase.
    pub fn stage_epochs(&self) -> Epochs {
        let mut e = Epochs::default();
        for s in &self.stages {
            if s.kind.is_feature_extraction() {
                e.feature_extraction += u64::from(s.epochs());
            } else {
                e.fine_tuning += u64::from(s.epochs());
            }
        }
        e
    }

    /// The stages trial `trial` runs through, root first.
    pub fn path(&self, trial: usize) -> Vec<usize> {
        let Some(end) = self.ending.get(trial).and_then(|&i| self.stages.get(i)) else { return Vec::new() };
        let mut path = vec![end.index];
        let mut at = end.parent;
        while let Some(p) = at {
            path.push(p);
            at = self.stages[p].parent;
        }
        path.reverse();
        path
    }

    /// The stage on `trial`'s path that holds its epoch `epoch` (1-based), if it has one.
    pub fn stage_at(&self, trial: usize, epoch: u32) -> Option<&Stage> {
        // Up from the stage the trial ends in (no allocation: the store asks this for every
        // waiting trial of a sweep at every hand-out).
        let mut at = self.ending.get(trial).and_then(|&i| self.stages.get(i));
        while let Some(s) = at {
            if epoch > s.last_epoch {
                return None;
            }
            if epoch >= s.first_epoch {
                return Some(s);
            }
            at = s.parent.map(|p| &self.stages[p]);
        }
        None
    }

    /// The trials that compute epoch `epoch` together with `trial` (itself included), in grid
    /// order: those whose epochs `1..=epoch` are `trial`'s. Empty when `trial` has no such
    /// epoch.
    pub fn sharers(&self, trial: usize, epoch: u32) -> &[usize] {
        self.stage_at(trial, epoch).map(|s| s.trials.as_slice()).unwrap_or(&[])
    }

    /// Whether `trial`'s epoch `epoch` is computed for other trials too.
    pub fn is_shared(&self, trial: usize, epoch: u32) -> bool {
        self.sharers(trial, epoch).len() > 1
    }

    /// The last epochs of the stages on `trial`'s path that other trials share: the points
    /// where a branch starts from a shared stage's end state, which must be kept.
    pub fn shared_stage_ends(&self, trial: usize) -> Vec<u32> {
        self.path(trial)
            .into_iter()
            .map(|s| &self.stages[s])
            .filter(|s| s.trials.len() > 1)
            .map(|s| s.last_epoch)
            .collect()
    }

    /// The runs of `trial`'s epochs that other trials share, first epoch first; consecutive
    /// stages shared with the same trials are one run.
    pub fn shared(&self, trial: usize) -> Vec<Shared> {
        let mut out: Vec<Shared> = Vec::new();
        for s in self.path(trial) {
            let s = &self.stages[s];
            let with: Vec<usize> = s.trials.iter().copied().filter(|&i| i != trial).collect();
            if with.is_empty() {
                continue;
            }
            match out.last_mut() {
                Some(prev) if prev.with == with && prev.last_epoch + 1 == s.first_epoch => {
                    prev.last_epoch = s.last_epoch
                }
                _ => out.push(Shared { first_epoch: s.first_epoch, last_epoch: s.last_epoch, with }),
            }
        }
        out
    }

    /// The cost of the longest chain from the start of `stage` to the end of a trial below it,
    /// `cost` giving each stage's own (the critical path: what is left to run after it starts,
    /// at best).
    pub fn critical_path(&self, stage: usize, cost: &dyn Fn(&Stage) -> f64) -> f64 {
        let s = &self.stages[stage];
        let below = s.children.iter().map(|&c| self.critical_path(c, cost)).fold(0.0, f64::max);
        cost(s) + below
    }

    /// Which of `candidates` (grid indexes of trials that stand at the same point) runs on from
    /// there: the one with the longest chain (the most epochs), then the most
    /// feature-extraction epochs, then the lowest grid index. `schedule::ready` picks by it
    /// among the trials waiting at a point.
    ///
    /// The second rule keeps feature extraction in as few attempts as the first allows: among
    /// equal chains, the runner of a feature-extraction stage goes on through the most later
    /// feature-extraction epochs in the same attempt, whose feature cache serves them all (one
    /// backbone pass), instead of turning to fine-tuning and leaving them to a new attempt that
    /// builds a cache of its own.
    pub fn runner_among(&self, candidates: &[usize]) -> Option<usize> {
        let key = |t: usize| self.trials.get(t).map_or((0, 0), |x| (x.epochs(), x.fe_epochs));
        candidates.iter().copied().min_by_key(|&t| {
            let (epochs, fe) = key(t);
            (std::cmp::Reverse(epochs), std::cmp::Reverse(fe), t)
        })
    }

    /// The trial that runs `stage` when nothing fails: [`StageTree::runner_among`] its trials.
    /// One attempt of that trial runs its whole chain, so a child stage with the same runner
    /// continues its parent's attempt.
    pub fn runner(&self, stage: usize) -> Option<usize> {
        self.runner_among(&self.stages.get(stage)?.trials)
    }

    /// Whether `stage` continues its parent's attempt (see [`StageTree::runner`]).
    pub fn continues_parent(&self, stage: usize) -> bool {
        let parent = self.stages.get(stage).and_then(|s| s.parent);
        parent.is_some_and(|p| self.runner(p) == self.runner(stage))
    }

    /// `"epochs 1–8 shared with t003, t009"` for each shared run of `trial` (empty when none).
    pub fn shared_label(&self, trial: usize) -> String {
        let runs: Vec<(u32, u32, Vec<String>)> = self
            .shared(trial)
            .iter()
            .map(|r| (r.first_epoch, r.last_epoch, r.with.iter().map(|&i| grid::trial_id(i)).collect()))
            .collect();
        runs_label(&runs)
    }
}

/// `"epochs 1–8 shared with t003, t009; epoch 9 shared with t003"` from
/// `(first epoch, last epoch, other trials)` runs.
pub fn runs_label(runs: &[(u32, u32, Vec<String>)]) -> String {
    runs.iter()
        .map(|(first, last, with)| {
            let epochs = if first == last { format!("epoch {first}") } else { format!("epochs {first}–{last}") };
            format!("{epochs} shared with {}", with.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The shared runs of one trial's stored epochs, `(epoch, the other trials it belongs to)` in
/// epoch order: consecutive epochs shared with the same trials are one run; unshared epochs
/// are left out.
pub fn stored_runs(epochs: &[(u32, Vec<String>)]) -> Vec<(u32, u32, Vec<String>)> {
    let mut out: Vec<(u32, u32, Vec<String>)> = Vec::new();
    for (epoch, with) in epochs {
        if with.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((_, last, w)) if *w == *with && *last + 1 == *epoch => *last = *epoch,
            _ => out.push((*epoch, *epoch, with.clone())),
        }
    }
    out
}

/// Estimated floating-point operations of one epoch of `backbone` in `spec`'s sweep, or `None`
/// when the spec does not tell the image count (an image folder). A forward pass costs
/// 2 × the backbone's multiply-adds scaled by the image's area; a feature-extraction step is
/// about one forward pass (the backbone is frozen, only the small head learns), a fine-tuning
/// step about three (forward and backward through every layer); validation is one forward pass
/// per image. An estimate for planning, not a measurement.
pub fn epoch_flops(spec: &SweepSpec, backbone: Backbone, kind: &EpochKind) -> Option<f64> {
    let (train, val) = spec.dataset.image_counts()?;
    let forward = forward_flops(spec, backbone);
    let passes = if kind.is_feature_extraction() { 1.0 } else { 3.0 };
    Some(forward * (train as f64 * passes + val as f64))
}

/// Floating-point operations of one image's forward pass (see [`epoch_flops`]).
fn forward_flops(spec: &SweepSpec, backbone: Backbone) -> f64 {
    let side = f64::from(spec.dataset.image_size()) / 224.0;
    2.0 * backbone.imagenet_gmacs() * 1e9 * side * side
}

/// Whether a worker's feature cache serves feature extraction of `backbone` under `spec`: the
/// frozen backbone's output then depends on the image alone — BatchNorm statistics frozen
/// (`training.freeze_bn_stats`), no augmentation in the phase
/// (`training.feature_extraction.augment: false`, or no augmentation at all), and no
/// stochastic depth (every backbone but efficientnet_b0), on one device or several (data
/// parallel, the replicas share out the cache's pass) — so a run of two feature-extraction
/// epochs or more computes it once, then only for the batches of another size than the cache's
/// ([`run_flops`]; `sweep_worker::train`, whose
/// test `the_feature_cache_serves_only_a_pure_frozen_backbone` keeps the two in step; a worker started with
/// `SWEEP_FEATURE_CACHE=off` does not cache).
pub fn feature_cache_applies(spec: &SweepSpec, backbone: Backbone) -> bool {
    spec.training.freeze_bn_stats
        && spec.training.augment_in(Phase::FeatureExtraction).is_identity()
        && backbone != Backbone::EfficientnetB0
}

/// Floating-point operations of `epochs` consecutive epochs of `kind` that one attempt runs:
/// `epochs` × [`epoch_flops`], except for feature extraction that the feature cache serves
/// ([`feature_cache_applies`]) in a run of two epochs or more: the cache's build runs the
/// backbone once over the training and the validation images ([`epoch_flops`]), and every
/// epoch of the run, the first included, runs it again over what the cache does not serve
/// ([`cached_epoch_flops`]). The head's own cost, a matrix product per image, is left out here
/// as in every epoch's estimate.
pub fn run_flops(spec: &SweepSpec, backbone: Backbone, kind: &EpochKind, epochs: u32) -> Option<f64> {
    part_of_run_flops(spec, backbone, kind, epochs, epochs, true)
}

/// Floating-point operations of `epochs` consecutive epochs of `kind` within a run of `run`
/// such epochs that one attempt runs, `first` when they begin the run (a stage that starts an
/// attempt, not one that continues its parent's): [`run_flops`] split between the run's parts,
/// the cache's build charged to the first.
pub fn part_of_run_flops(
    spec: &SweepSpec,
    backbone: Backbone,
    kind: &EpochKind,
    epochs: u32,
    run: u32,
    first: bool,
) -> Option<f64> {
    let one = epoch_flops(spec, backbone, kind)?;
    let cached = kind.is_feature_extraction() && run >= 2 && feature_cache_applies(spec, backbone);
    if !cached {
        return Some(one * f64::from(epochs));
    }
    let build = if first { one } else { 0.0 };
    Some(build + f64::from(epochs) * cached_epoch_flops(spec, backbone)?)
}

/// Floating-point operations of the backbone in an epoch of feature extraction that the feature
/// cache serves: its forward pass over the training images in parts of another size than the
/// cache's ([`batching::feature_cache_batch`]: with one replica at most the epoch's last batch;
/// data parallel, the parts of the last global batch), computed afresh every epoch.
pub fn cached_epoch_flops(spec: &SweepSpec, backbone: Backbone) -> Option<f64> {
    let (train, _) = spec.dataset.image_counts()?;
    let train = usize::try_from(train).unwrap_or(usize::MAX);
    let world = spec.resources.gpus_per_trial.max(1) as usize;
    let read = batching::feature_cache_batch(train, spec.training.batch_size as usize, world).map_or(0, |c| c.read);
    Some((train - read.min(train)) as f64 * forward_flops(spec, backbone))
}

/// Epochs of the kind of epoch `done + 1` that `trial` runs from there without a change of kind.
fn run_left(trial: &Trial, done: u32) -> u32 {
    if done < trial.fe_epochs { trial.fe_epochs - done } else { trial.epochs() - done }
}

fn bits(x: f64) -> String {
    format!("{:016x}", x.to_bits())
}

/// A string with its length first, so no value can be read as two.
fn text(s: &str) -> String {
    format!("{}:{s}", s.len())
}

fn dataset(d: &DatasetSpec) -> String {
    match d {
        DatasetSpec::Synthetic { classes, train_per_class, val_per_class, image_size, seed } => {
            format!(
                "synthetic classes={classes} train={train_per_class} val={val_per_class} size={image_size} seed={seed}"
            )
        }
        DatasetSpec::ImageFolder { root, image_size, skip_corrupt } => {
            format!("image_folder root={} size={image_size} skip_corrupt={skip_corrupt}", text(root))
        }
        DatasetSpec::Flowers102 { root, train_split, val_split, image_size, skip_corrupt } => {
            let names = |s: &[crate::spec::FlowersSplit]| s.iter().map(|x| x.name()).collect::<Vec<_>>().join(",");
            format!(
                "flowers102 root={} train={} val={} size={image_size} skip_corrupt={skip_corrupt}",
                text(root),
                names(train_split),
                names(val_split)
            )
        }
    }
}

fn pretrain(p: &Option<PretrainSpec>) -> String {
    match p {
        None => "none".into(),
        Some(p) => format!(
            "dataset=({}) epochs={} lr={} batch={} seed={}",
            dataset(&p.dataset),
            p.epochs,
            bits(p.lr),
            p.batch_size,
            p.seed
        ),
    }
}

/// The content keys of `trial`'s epochs: element `e - 1` names epochs `1..=e` (the key of any
/// stage, in any sweep, that ends at epoch `e` on the way to this trial). Two trials of any two
/// sweeps whose keys at `e` are equal compute bit-identical epochs `1..=e` and end them in the
/// same state, so a stored state of one is a resume point of the other.
pub fn epoch_keys(spec: &SweepSpec, trial: &Trial) -> Vec<StageKey> {
    let base = base_key(spec, trial.backbone);
    let mut path: Vec<(String, u32)> = Vec::new();
    (1..=trial.epochs())
        .map(|e| {
            let canonical = EpochKind::of(trial, e).canonical(spec);
            match path.last_mut() {
                Some((k, n)) if *k == canonical => *n += 1,
                _ => path.push((canonical, 1)),
            }
            stage_key(&base, &path)
        })
        .collect()
}

/// Everything every epoch of `backbone`'s trials shares, exactly.
fn base_key(spec: &SweepSpec, backbone: Backbone) -> String {
    let t = &spec.training;
    let a = &t.augment;
    let weights = match &spec.model.weights {
        Weights::None => "none".to_string(),
        Weights::ImageNet => "imagenet".to_string(),
        Weights::File(path) => format!("file {}", text(path)),
    };
    let mut s = String::new();
    let _ = writeln!(s, "sweep stage v{TRAINING_VERSION}");
    let _ = writeln!(s, "backbone={}", backbone.name());
    let _ = writeln!(s, "dataset={}", dataset(&spec.dataset));
    let _ = writeln!(s, "weights={weights}");
    let _ = writeln!(s, "pretrain={}", pretrain(&spec.pretrain));
    let _ = writeln!(
        s,
        "batch={} optimizer={:?} weight_decay={} seed={} freeze_bn_stats={}",
        t.batch_size,
        t.optimizer,
        bits(t.weight_decay),
        t.seed,
        t.freeze_bn_stats
    );
    let _ = writeln!(
        s,
        "augment hflip={} rotation={} shear={} jitter={}",
        a.hflip,
        bits(a.rotation_deg),
        bits(a.shear_deg),
        bits(a.color_jitter)
    );
    let _ = writeln!(s, "replicas={}", spec.resources.gpus_per_trial);
    s
}

fn stage_key(base: &str, path: &[(String, u32)]) -> StageKey {
    let mut h = Sha256::new();
    h.update(base.as_bytes());
    for (kind, n) in path {
        h.update(format!("{kind} x{n}\n").as_bytes());
    }
    StageKey(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec;
    use std::collections::BTreeMap;

    const GUIDE: &str = "\
name: guide
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [vgg16_bn, resnet50, resnet152]
  lr_decay:
    - { strategy: linear, head_lr: 1.0e-4, final_lr: 1.0e-7 }
    - { strategy: exponential, head_lr: 1.0e-4, factor: 3 }
  epoch_split: [[16, 8], [12, 12], [8, 16]]
";

    #[test]
    fn a_cached_feature_extraction_run_costs_its_first_epoch() {
        let with = |base: &str, training: &str| spec::parse(&format!("{base}training:\n{training}")).unwrap();
        let pure = "  freeze_bn_stats: true\n  feature_extraction: { augment: false }\n";
        let fe = EpochKind::FeatureExtraction;
        let ft = EpochKind::FineTuning(LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 });
        let s = with(GUIDE, pure);
        for b in [Backbone::Resnet50, Backbone::Vgg16Bn] {
            assert!(feature_cache_applies(&s, b));
            let one = epoch_flops(&s, b, &fe).unwrap();
            assert_eq!(run_flops(&s, b, &fe, 8), Some(one));
            assert_eq!(run_flops(&s, b, &fe, 1), Some(one));
            // Fine-tuning trains the backbone: every epoch runs it.
            assert_eq!(run_flops(&s, b, &ft, 8), Some(8.0 * epoch_flops(&s, b, &ft).unwrap()));
        }
        // Data parallel: the replicas share out the cache's pass. 96 training images in global
        // batches of 64 on two replicas: parts of 32, 32, then of 16, 16, which the cache (of
        // 32) does not serve: each epoch runs the backbone over those 32 images again.
        let mut dp = s.clone();
        dp.resources.gpus_per_trial = 2;
        assert!(feature_cache_applies(&dp, Backbone::Resnet50));
        let one = epoch_flops(&dp, Backbone::Resnet50, &fe).unwrap();
        let per_image = one / (96.0 + 48.0);
        let got = run_flops(&dp, Backbone::Resnet50, &fe, 8).unwrap();
        assert!((got - (one + 8.0 * 32.0 * per_image)).abs() < 1e-9 * got, "{got}");
        // One replica, a last batch of 16 (80 = 32 + 32 + 16): the same 16 images afresh.
        let mut short = s.clone();
        short.dataset = spec::parse(&GUIDE.replace("classes: 3", "classes: 2, train_per_class: 40")).unwrap().dataset;
        let one = epoch_flops(&short, Backbone::Resnet50, &fe).unwrap();
        let per_image = one / (80.0 + 32.0);
        let got = run_flops(&short, Backbone::Resnet50, &fe, 8).unwrap();
        assert!((got - (one + 8.0 * 16.0 * per_image)).abs() < 1e-9 * got, "{got}");
        // Stochastic depth inside the backbone, augmented feature extraction, BatchNorm
        // training: every epoch runs the backbone.
        for (what, spec, b) in [
            ("efficientnet_b0", with(&GUIDE.replace("vgg16_bn", "efficientnet_b0"), pure), Backbone::EfficientnetB0),
            ("augmented", with(GUIDE, "  freeze_bn_stats: true\n"), Backbone::Resnet50),
            ("BatchNorm training", with(GUIDE, "  feature_extraction: { augment: false }\n"), Backbone::Resnet50),
        ] {
            assert!(!feature_cache_applies(&spec, b), "{what}");
            assert_eq!(run_flops(&spec, b, &fe, 8), Some(8.0 * epoch_flops(&spec, b, &fe).unwrap()), "{what}");
        }
    }

    #[test]
    fn epoch_keys_name_the_stages_that_end_there_in_any_sweep() {
        let spec = spec::parse(GUIDE).unwrap();
        let tree = StageTree::build(&spec, true);
        for s in &tree.stages {
            for &t in &s.trials {
                assert_eq!(epoch_keys(&spec, &tree.trials[t])[s.last_epoch as usize - 1], s.key, "{}", s.id());
            }
        }
        // Another sweep with one of these trials alone: the same keys, epoch by epoch.
        let alone = spec::parse(&GUIDE.replace("[[16, 8], [12, 12], [8, 16]]", "[[12, 12]]")).unwrap();
        let one = &grid::expand(&alone.grid)[0];
        let same = tree
            .trials
            .iter()
            .find(|t| t.backbone == one.backbone && t.lr_decay == one.lr_decay && t.fe_epochs == 12)
            .unwrap();
        assert_eq!(epoch_keys(&alone, one), epoch_keys(&spec, same));
        // Feature extraction does not depend on the strategy; fine-tuning does; the seed changes all.
        let (a, b) = (&tree.trials[0], &tree.trials[3]);
        assert_eq!((a.fe_epochs, b.fe_epochs, a.backbone), (16, 16, b.backbone));
        assert_ne!(a.lr_decay, b.lr_decay);
        let (ka, kb) = (epoch_keys(&spec, a), epoch_keys(&spec, b));
        assert_eq!(ka[..16], kb[..16]);
        assert_ne!(ka[16], kb[16]);
        let seeded = spec::parse(&format!("{GUIDE}training: {{ seed: 7 }}\n")).unwrap();
        assert_ne!(epoch_keys(&seeded, a)[0], ka[0]);
        let keys: std::collections::HashSet<_> = ka.iter().collect();
        assert_eq!(keys.len(), ka.len(), "every prefix has its own key");
    }

    /// Trials by the stages they end in: for each trial, its last stage (a trial ends in exactly
    /// one).
    fn ending_stage(tree: &StageTree) -> BTreeMap<usize, usize> {
        let mut out = BTreeMap::new();
        for s in &tree.stages {
            for &t in &s.ends {
                out.insert(t, s.index);
            }
        }
        out
    }

    fn tree(text: &str, sharing: bool) -> StageTree {
        StageTree::build(&spec::parse(text).unwrap(), sharing)
    }

    /// Every trial's path covers its epochs exactly once, in order, with the right kinds.
    fn assert_paths_are_the_trials(t: &StageTree) {
        for trial in &t.trials {
            let mut next = 1;
            for s in t.path(trial.index) {
                let s = &t.stages[s];
                assert_eq!(s.first_epoch, next, "{} stage {}", trial.id, s.id());
                assert!(s.trials.contains(&trial.index));
                for e in s.first_epoch..=s.last_epoch {
                    assert_eq!(s.kind, EpochKind::of(trial, e), "{} epoch {e}", trial.id);
                }
                next = s.last_epoch + 1;
            }
            assert_eq!(next, trial.epochs() + 1, "{} ends where its epochs end", trial.id);
        }
    }

    #[test]
    fn the_guides_grid_runs_48_distinct_feature_extraction_epochs_of_216() {
        let t = tree(GUIDE, true);
        assert_eq!(t.naive_epochs(), Epochs { feature_extraction: 216, fine_tuning: 216 });
        let shared = t.stage_epochs();
        assert_eq!(shared.feature_extraction, 48, "16 per backbone");
        // Fine-tuning branches where feature extraction ends: nothing to share across splits.
        assert_eq!(shared.fine_tuning, 216);
        assert_eq!(t.roots.len(), 3);
        assert_paths_are_the_trials(&t);
        // vgg16_bn: epochs 1–8 shared by its 6 trials, then 9–12 by the 4 with 12 or 16.
        let root = &t.stages[t.roots[0]];
        assert_eq!((root.backbone, root.first_epoch, root.last_epoch), (Backbone::Vgg16Bn, 1, 8));
        assert_eq!(root.trials.len(), 6);
        assert_eq!(
            t.shared_label(0),
            "epochs 1–8 shared with t001, t002, t003, t004, t005; epochs 9–12 shared with t001, t003, t004; \
             epochs 13–16 shared with t003"
        );
        let eight = t.trials.iter().find(|x| x.fe_epochs == 8 && x.backbone == Backbone::Vgg16Bn).unwrap();
        assert_eq!(t.shared(eight.index).len(), 1);
        assert_eq!(t.shared(eight.index)[0].with.len(), 5);
    }

    #[test]
    fn without_sharing_every_trial_is_its_own_chain() {
        let t = tree(GUIDE, false);
        assert_eq!(t.stage_epochs(), t.naive_epochs());
        assert_eq!(t.roots.len(), 18);
        assert_eq!(t.stages.len(), 36);
        assert_paths_are_the_trials(&t);
        assert!(t.trials.iter().all(|x| t.shared(x.index).is_empty()));
    }

    #[test]
    fn fine_tuning_is_shared_by_trials_with_the_same_feature_extraction_and_strategy() {
        let spec = "\
name: ft
dataset: { kind: synthetic, classes: 3 }
grid:
  backbone: [resnet18]
  lr_decay: [{ strategy: linear }, { strategy: exponential }]
  epoch_split: [[2, 3], [2, 5], [4, 1]]
";
        let t = tree(spec, true);
        assert_paths_are_the_trials(&t);
        // FE 1–2 (all 6), FE 3–4 (the two [4,1]); FT 3–5 per strategy shared by [2,3] and [2,5].
        assert_eq!(t.stage_epochs(), Epochs { feature_extraction: 4, fine_tuning: 2 * (3 + 2) + 2 });
        let lin = t.trials.iter().find(|x| x.split_label() == "2+5" && x.lr_decay.strategy() == "linear").unwrap();
        let label = t.shared_label(lin.index);
        assert!(label.starts_with("epochs 1–2 shared with t000, t002, t003, t004, t005; "), "{label}");
        assert!(label.ends_with("epochs 3–5 shared with t000"), "{label}");
    }

    #[test]
    fn keys_name_the_epochs_not_the_way_a_tree_is_cut() {
        let one = tree(
            "name: a\ndataset: { kind: synthetic, classes: 3 }\ngrid: { backbone: [resnet18], lr_decay: [{ strategy: linear }], epoch_split: [[16, 8]] }\n",
            true,
        );
        let two = tree(
            "name: b\ndataset: { kind: synthetic, classes: 3 }\ngrid: { backbone: [resnet18], lr_decay: [{ strategy: linear }], epoch_split: [[8, 1], [16, 8]] }\n",
            true,
        );
        let fe16 = |t: &StageTree| {
            t.stages.iter().find(|s| s.kind.is_feature_extraction() && s.last_epoch == 16).unwrap().key.clone()
        };
        // [16, 8] alone: FE 1–16 is one stage; beside [8, 1] it is 1–8 then 9–16: same key at 16.
        assert_eq!(fe16(&one), fe16(&two));
        let ft = |t: &StageTree| t.stages.iter().find(|s| s.last_epoch == 24).unwrap().key.clone();
        assert_eq!(ft(&one), ft(&two), "the sweep's name is not part of what an epoch computes");
        let eight = two.stages.iter().find(|s| s.last_epoch == 8).unwrap();
        assert_ne!(eight.key, fe16(&two));
        // Anything that changes an epoch changes the key.
        for change in ["training: { seed: 1 }", "training: { batch_size: 16 }", "resources: { gpus_per_trial: 2 }"] {
            let other = tree(
                &format!(
                    "name: a\ndataset: {{ kind: synthetic, classes: 3 }}\n{change}\ngrid: {{ backbone: [resnet18], lr_decay: [{{ strategy: linear }}], epoch_split: [[16, 8]] }}\n"
                ),
                true,
            );
            assert_ne!(fe16(&other), fe16(&one), "{change}");
        }
        let keys: std::collections::HashSet<_> = tree(GUIDE, true).stages.into_iter().map(|s| s.key).collect();
        assert_eq!(keys.len(), tree(GUIDE, true).stages.len(), "stages of one tree have distinct keys");
    }

    #[test]
    fn unaugmented_feature_extraction_has_keys_of_its_own_unless_nothing_was_augmented() {
        let with = |training: &str| {
            let text = format!(
                "name: a\ndataset: {{ kind: synthetic, classes: 3 }}\ntraining: {training}\ngrid: {{ backbone: [resnet18], lr_decay: [{{ strategy: linear }}], epoch_split: [[2, 1]] }}\n"
            );
            let spec = spec::parse(&text).unwrap();
            epoch_keys(&spec, &grid::expand(&spec.grid)[0])
        };
        let default = with("{ seed: 0 }");
        assert_eq!(with("{ feature_extraction: { augment: true } }"), default, "the default is the old key");
        let plain = with("{ feature_extraction: { augment: false } }");
        assert_ne!(plain[0], default[0]);
        assert_ne!(plain[2], default[2], "fine-tuning after it starts elsewhere");
        // With nothing augmented anyway, the setting changes no epoch and no key.
        let off = "augment: { hflip: false, rotation_deg: 0, shear_deg: 0, color_jitter: 0 }";
        assert_eq!(
            with(&format!("{{ {off}, feature_extraction: {{ augment: false }} }}")),
            with(&format!("{{ {off} }}"))
        );
    }

    #[test]
    fn the_critical_path_is_the_longest_chain_below() {
        let t = tree(GUIDE, true);
        let epochs = |s: &Stage| f64::from(s.epochs());
        for &r in &t.roots {
            assert_eq!(t.critical_path(r, &epochs), 24.0, "every trial has 24 epochs");
        }
        let leaf = t.stages.iter().find(|s| s.children.is_empty()).unwrap();
        assert_eq!(t.critical_path(leaf.index, &epochs), f64::from(leaf.epochs()));
        assert_eq!(ending_stage(&t).len(), 18);
    }

    proptest::proptest! {
        #[test]
        fn any_grid_is_covered_exactly_and_never_costs_more(
            splits in proptest::collection::hash_set((1u32..12, 1u32..12), 1..6),
            backbones in 1usize..3,
            strategies in 1usize..3,
        ) {
            let splits: Vec<String> = splits.iter().map(|(a, b)| format!("[{a}, {b}]")).collect();
            let text = format!(
                "name: p\ndataset: {{ kind: synthetic, classes: 3 }}\ngrid: {{ backbone: [{}], lr_decay: [{}], epoch_split: [{}] }}\n",
                ["resnet18", "resnet34"][..backbones].join(", "),
                ["{ strategy: linear }", "{ strategy: exponential }"][..strategies].join(", "),
                splits.join(", ")
            );
            let t = tree(&text, true);
            assert_paths_are_the_trials(&t);
            let (naive, shared) = (t.naive_epochs(), t.stage_epochs());
            proptest::prop_assert!(shared.feature_extraction <= naive.feature_extraction);
            proptest::prop_assert!(shared.fine_tuning <= naive.fine_tuning);
            // Feature extraction is one chain per backbone, as long as its longest.
            let longest = t.trials.iter().map(|x| u64::from(x.fe_epochs)).max().unwrap_or(0);
            proptest::prop_assert_eq!(shared.feature_extraction, longest * backbones as u64);
            proptest::prop_assert_eq!(ending_stage(&t).len(), t.trials.len());
        }
    }
}
