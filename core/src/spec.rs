//! The sweep spec: the YAML document users write (`sweeps/*.yaml`), parsed and validated.
//!
//! This is the only module that knows about YAML. Parsing happens in two passes over the same
//! text:
//! 1. `serde_yaml` deserializes into `Raw*` structs that reject unknown keys and wrong types
//!    (its errors already carry line and column);
//! 2. [`validate`](RawSpec::validate) turns the raw structs into the typed [`SweepSpec`],
//!    checking every value. Those errors name a field path (`grid.epoch_split[1][0]`), which a
//!    position index built from `yaml-rust2`'s marked events turns into a line and column.
//!
//! Every error is one [`SpecError`]: line, column, field and message. Parsing never panics.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use serde::Deserialize;

use crate::backbone::{self, Backbone};
use crate::early_stop::{EarlyStopping, Metric, Strategy};
use crate::lr::LrDecay;

/// Default upper bound on the number of trials in one sweep's grid.
pub const DEFAULT_MAX_TRIALS: usize = 10_000;

/// Options of the parser itself (not part of the document).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    /// A grid with more trials than this is refused.
    pub max_trials: usize,
    /// The spec was accepted and stored by a coordinator before (a worker reading its
    /// assignment, the history checker): the limits that guard new submissions only — the
    /// grid's size, the name's length and characters, a synthetic set's memory — are not
    /// applied again, so that a sweep accepted by an older version still runs.
    pub stored: bool,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions { max_trials: DEFAULT_MAX_TRIALS, stored: false }
    }
}

impl ParseOptions {
    /// A new submission with at most `max_trials` trials.
    pub fn with_max_trials(max_trials: usize) -> Self {
        ParseOptions { max_trials, ..ParseOptions::default() }
    }

    /// A spec a coordinator accepted and stored.
    pub fn stored() -> Self {
        ParseOptions { max_trials: usize::MAX, stored: true }
    }
}

/// One error in a spec: where it is (1-based line and column), which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecError {
    pub line: usize,
    pub column: usize,
    /// Dotted path of the field (`grid.backbone[2]`); empty for the document itself.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
        } else {
            write!(f, "line {}, column {}: {}: {}", self.line, self.column, self.field, self.message)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Typed spec
// ---------------------------------------------------------------------------------------------

/// A validated sweep spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub name: String,
    pub dataset: DatasetSpec,
    pub model: ModelSpec,
    pub training: TrainingSpec,
    pub grid: GridSpec,
    pub resources: Resources,
    pub retries: Retries,
    /// Pretrain each backbone from scratch on a dataset first, and run the sweep from those
    /// weights (the guide's way around ImageNet's licence).
    pub pretrain: Option<PretrainSpec>,
    /// Stop hopeless trials before their last epoch (`early_stopping:`); `None` runs every
    /// trial to its end.
    pub early_stopping: Option<EarlyStopping>,
    /// Run the epochs several trials share once (`sharing: on`, the default): the stage tree of
    /// `crate::stages`. `off` runs every trial alone from its first epoch.
    pub sharing: bool,
}

/// Pretraining from random weights: every layer trains with Adam at `lr` for `epochs` on
/// `dataset` (with the sweep's augmentation). The result is cached by the content of this
/// section, the backbone and the augmentation, so later trials and sweeps reuse it.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainSpec {
    pub dataset: DatasetSpec,
    pub epochs: u32,
    pub lr: f64,
    pub batch_size: u32,
    pub seed: u64,
}

/// Where the images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSpec {
    /// Class-dependent images drawn procedurally (demos and tests).
    Synthetic { classes: u32, train_per_class: u32, val_per_class: u32, image_size: u32, seed: u64 },
    /// `root/train/<class>/*` and `root/val/<class>/*`.
    ImageFolder { root: String, image_size: u32, skip_corrupt: bool },
    /// The official Oxford Flowers-102 layout: `jpg/`, `imagelabels.mat`, `setid.mat`.
    Flowers102 {
        root: String,
        train_split: Vec<FlowersSplit>,
        val_split: Vec<FlowersSplit>,
        image_size: u32,
        skip_corrupt: bool,
    },
}

impl DatasetSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            DatasetSpec::Synthetic { .. } => "synthetic",
            DatasetSpec::ImageFolder { .. } => "image_folder",
            DatasetSpec::Flowers102 { .. } => "flowers102",
        }
    }

    /// Bytes the decoded images take in a worker's memory (3 × size² per image), where the spec
    /// alone tells (a synthetic dataset); `None` for datasets read from files.
    pub fn estimated_bytes(&self) -> Option<u128> {
        match self {
            DatasetSpec::Synthetic { classes, train_per_class, val_per_class, image_size, .. } => Some(
                u128::from(*classes)
                    * (u128::from(*train_per_class) + u128::from(*val_per_class))
                    * 3
                    * u128::from(*image_size)
                    * u128::from(*image_size),
            ),
            _ => None,
        }
    }

    /// Training and validation images per epoch, where the spec alone tells (synthetic data,
    /// and Flowers-102's fixed splits: train 1,020, val 1,020, test 6,149); `None` for an image
    /// folder.
    pub fn image_counts(&self) -> Option<(u64, u64)> {
        let flowers = |splits: &[FlowersSplit]| {
            splits
                .iter()
                .map(|s| match s {
                    FlowersSplit::Train | FlowersSplit::Val => 1020,
                    FlowersSplit::Test => 6149,
                })
                .sum::<u64>()
        };
        match self {
            DatasetSpec::Synthetic { classes, train_per_class, val_per_class, .. } => Some((
                u64::from(*classes) * u64::from(*train_per_class),
                u64::from(*classes) * u64::from(*val_per_class),
            )),
            DatasetSpec::ImageFolder { .. } => None,
            DatasetSpec::Flowers102 { train_split, val_split, .. } => Some((flowers(train_split), flowers(val_split))),
        }
    }

    /// Whether unreadable images are skipped (and counted) instead of failing the trial.
    pub fn skip_corrupt(&self) -> bool {
        match self {
            DatasetSpec::Synthetic { .. } => false,
            DatasetSpec::ImageFolder { skip_corrupt, .. } | DatasetSpec::Flowers102 { skip_corrupt, .. } => {
                *skip_corrupt
            }
        }
    }

    pub fn image_size(&self) -> u32 {
        match self {
            DatasetSpec::Synthetic { image_size, .. }
            | DatasetSpec::ImageFolder { image_size, .. }
            | DatasetSpec::Flowers102 { image_size, .. } => *image_size,
        }
    }
}

/// The three official Flowers-102 splits (`setid.mat`: `trnid`, `valid`, `tstid`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlowersSplit {
    Train,
    Val,
    Test,
}

impl FlowersSplit {
    pub const ALL: [(&'static str, FlowersSplit); 3] =
        [("train", FlowersSplit::Train), ("val", FlowersSplit::Val), ("test", FlowersSplit::Test)];

    pub fn name(self) -> &'static str {
        match self {
            FlowersSplit::Train => "train",
            FlowersSplit::Val => "val",
            FlowersSplit::Test => "test",
        }
    }
}

/// Which weights the backbone starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// Random initialisation.
    None,
    /// `<weights dir>/<backbone>.safetensors` (ImageNet weights exported from torchvision).
    ImageNet,
    /// One safetensors file used for every backbone of the grid.
    File(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub weights: Weights,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSpec {
    pub batch_size: u32,
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub seed: u64,
    /// Learning rate of the new layers during feature extraction.
    pub feature_extraction_lr: f64,
    /// Augment the training batches of feature extraction too (`training.feature_extraction.
    /// augment`, default true, as the recipe does); false trains the head on plain images, which
    /// with `freeze_bn_stats` lets the worker run the frozen backbone once per image.
    pub feature_extraction_augment: bool,
    /// Learning rate of parameters that belong to no layer group during fine-tuning.
    pub fine_tuning_default_lr: f64,
    /// Keep BatchNorm running statistics fixed during feature extraction (the recipe lets
    /// them update, so the default is `false`).
    pub freeze_bn_stats: bool,
    pub augment: Augment,
}

impl TrainingSpec {
    /// The augmentation of training batches in `phase`.
    pub fn augment_in(&self, phase: crate::leaderboard::Phase) -> Augment {
        match phase {
            crate::leaderboard::Phase::FeatureExtraction if !self.feature_extraction_augment => Augment::NONE,
            _ => self.augment,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    Adam,
}

impl Optimizer {
    pub const ALL: [(&'static str, Optimizer); 1] = [("adam", Optimizer::Adam)];
}

/// Augmentation of training batches (validation batches are never augmented).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    pub hflip: bool,
    /// Random rotation in `[-rotation_deg, rotation_deg]`.
    pub rotation_deg: f64,
    /// Random shear in `[-shear_deg, shear_deg]`.
    pub shear_deg: f64,
    /// Brightness, contrast and saturation factors drawn from `[1 - j, 1 + j]`.
    pub color_jitter: f64,
}

impl Augment {
    pub const NONE: Augment = Augment { hflip: false, rotation_deg: 0.0, shear_deg: 0.0, color_jitter: 0.0 };

    /// True when it changes no pixel (every step off), whatever it draws.
    pub fn is_identity(&self) -> bool {
        let changes = self.hflip || self.rotation_deg > 0.0 || self.shear_deg > 0.0 || self.color_jitter > 0.0;
        !changes
    }
}

impl Default for Augment {
    fn default() -> Self {
        Augment { hflip: true, rotation_deg: 15.0, shear_deg: 10.0, color_jitter: 0.3 }
    }
}

/// The three lists whose cross product is the set of trials.
#[derive(Debug, Clone, PartialEq)]
pub struct GridSpec {
    pub backbone: Vec<Backbone>,
    pub lr_decay: Vec<LrDecay>,
    /// `(feature-extraction epochs, fine-tuning epochs)`.
    pub epoch_split: Vec<(u32, u32)>,
}

impl GridSpec {
    pub fn trial_count(&self) -> usize {
        self.backbone.len().saturating_mul(self.lr_decay.len()).saturating_mul(self.epoch_split.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Devices (GPUs, or CPU slots on a CPU worker) one trial occupies.
    pub gpus_per_trial: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries {
    pub max_attempts: u32,
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Parses and validates a spec with the default options.
pub fn parse(text: &str) -> Result<SweepSpec, SpecError> {
    parse_with(text, ParseOptions::default())
}

/// Parses and validates a spec.
pub fn parse_with(text: &str, options: ParseOptions) -> Result<SweepSpec, SpecError> {
    // A byte-order mark (editors on Windows write one) is not part of the document.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let index = PositionIndex::build(text)?;
    if let Some((field, (line, column))) = &index.duplicate {
        let key = field.rsplit('.').next().unwrap_or(field);
        return Err(SpecError {
            line: *line,
            column: *column,
            // A key that is not a field name (`<<`, punctuation) makes no field path.
            field: if is_field_path(field) { field.clone() } else { String::new() },
            message: format!("`{key}` is given twice in one mapping; keep one"),
        });
    }
    if index.is_empty() {
        return Err(SpecError {
            line: 1,
            column: 1,
            field: String::new(),
            message: "the spec is empty: expected a mapping with `name`, `dataset` and `grid`".into(),
        });
    }
    let raw: RawSpec = serde_yaml::from_str(text).map_err(|e| from_serde(&e, &index))?;
    raw.validate(options).map_err(|(field, message)| {
        let (line, column) = index.locate(&field);
        SpecError { line, column, field, message }
    })
}

/// Turns a `serde_yaml` error into a [`SpecError`], recovering the field path that serde_yaml
/// puts in front of its message (`grid.backbone[1]: invalid type: ...`).
fn from_serde(e: &serde_yaml::Error, index: &PositionIndex) -> SpecError {
    let mut text = e.to_string();
    if let Some(at) = text.rfind(" at line ") {
        text.truncate(at);
    }
    let (field, message) = match text.split_once(": ") {
        Some((head, rest)) if is_field_path(head) => (head.to_string(), rest.to_string()),
        _ => (String::new(), text.clone()),
    };
    // Syntax, type and unknown-key errors come with a precise location; errors raised after a
    // whole mapping was read (missing fields) do not, and then the field path is the best guide.
    let (line, column) = match e.location() {
        Some(loc) if !message.starts_with("missing field") => (loc.line(), loc.column()),
        _ => index.locate(&field),
    };
    SpecError { line, column, field, message }
}

fn is_field_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']' | '-'))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
}

// ---------------------------------------------------------------------------------------------
// Position index: field path -> (line, column), from yaml-rust2's marked events
// ---------------------------------------------------------------------------------------------

/// Deepest nesting of collections accepted; a spec needs four levels.
const MAX_DEPTH: usize = 64;

struct PositionIndex {
    positions: BTreeMap<String, (usize, usize)>,
    /// The first key given twice in one mapping: its path and the position of its second use.
    duplicate: Option<(String, (usize, usize))>,
    /// False when the document holds no node, or only a null scalar (`---`, `~`, comments).
    has_content: bool,
}

enum Frame {
    /// `fill`: the mapping's own path, to be located at its first key (a mapping with no key of
    /// its own: the document root or a sequence item).
    Mapping {
        path: String,
        key: Option<(String, (usize, usize))>,
        fill: Option<String>,
        /// The keys seen so far (a key given twice is an error at its second place).
        seen: std::collections::HashSet<String>,
    },
    Sequence {
        path: String,
        next: usize,
    },
}

struct IndexBuilder {
    stack: Vec<Frame>,
    /// Per open collection: whether it is itself a mapping key.
    key_collections: Vec<bool>,
    index: PositionIndex,
}

impl IndexBuilder {
    /// The path of the node that starts now and the position of its key (in a mapping), or
    /// `None` when the node is itself a mapping key.
    fn node_path(&mut self) -> Option<(String, Option<(usize, usize)>)> {
        match self.stack.last_mut() {
            None => Some((String::new(), None)),
            Some(Frame::Mapping { key: None, .. }) => None,
            Some(Frame::Mapping { path, key, .. }) => {
                let (k, at) = key.take().unwrap_or_default();
                Some((if path.is_empty() { k } else { format!("{path}.{k}") }, Some(at)))
            }
            Some(Frame::Sequence { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some((p, None))
            }
        }
    }

    fn record(&mut self, path: String, pos: (usize, usize)) {
        self.index.positions.entry(path).or_insert(pos);
    }

    /// The current mapping's key was a node without a plain name (an alias, a collection): its
    /// value follows, and the key takes part in no duplicate check.
    fn key_without_name(&mut self, pos: (usize, usize)) {
        if let Some(Frame::Mapping { key, .. }) = self.stack.last_mut() {
            *key = Some(("?".into(), pos));
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, ev: yaml_rust2::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::Event;
        let pos = (mark.line(), mark.col() + 1);
        match ev {
            Event::Scalar(value, ..) => match self.node_path() {
                None => {
                    if let Some(Frame::Mapping { path, key, fill, seen }) = self.stack.last_mut() {
                        if !seen.insert(value.clone()) && self.index.duplicate.is_none() {
                            let at = if path.is_empty() { value.clone() } else { format!("{path}.{value}") };
                            self.index.duplicate = Some((at, pos));
                        }
                        *key = Some((value, pos));
                        if let Some(path) = fill.take() {
                            self.record(path, pos);
                        }
                    }
                }
                Some((path, _)) => {
                    if path.is_empty() && !matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL") {
                        self.index.has_content = true;
                    }
                    self.record(path, pos);
                }
            },
            Event::Alias(_) => match self.node_path() {
                Some((path, _)) => self.record(path, pos),
                // An alias used as a key: a key of its own (what it names is not compared).
                None => self.key_without_name(pos),
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                self.index.has_content = true;
                // A collection used as a mapping key is unusual; index it under a dummy name.
                let node = self.node_path();
                self.key_collections.push(node.is_none());
                let (path, key_pos) = node.unwrap_or_else(|| ("?".into(), None));
                // The marks of block collections point past their first key, so a collection is
                // located at its key when it has one.
                let is_mapping = matches!(ev, Event::MappingStart(..));
                let mut fill = None;
                match key_pos {
                    Some(at) => self.record(path.clone(), at),
                    None if is_mapping => fill = Some(path.clone()),
                    None => self.record(path.clone(), pos),
                }
                self.stack.push(if is_mapping {
                    Frame::Mapping { path, key: None, fill, seen: Default::default() }
                } else {
                    Frame::Sequence { path, next: 0 }
                });
            }
            Event::MappingEnd => {
                // An empty mapping (`{}`) with no key of its own: locate it where it started.
                if let Some(Frame::Mapping { fill: Some(path), .. }) = self.stack.pop() {
                    self.record(path, pos);
                }
                if self.key_collections.pop() == Some(true) {
                    self.key_without_name(pos);
                }
            }
            Event::SequenceEnd => {
                self.stack.pop();
                if self.key_collections.pop() == Some(true) {
                    self.key_without_name(pos);
                }
            }
            _ => {}
        }
    }
}

impl PositionIndex {
    fn build(text: &str) -> Result<PositionIndex, SpecError> {
        use yaml_rust2::Event;
        use yaml_rust2::parser::MarkedEventReceiver;
        let mut builder = IndexBuilder {
            stack: Vec::new(),
            key_collections: Vec::new(),
            index: PositionIndex { positions: BTreeMap::new(), duplicate: None, has_content: false },
        };
        let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
        // The events of the first document, read in a loop: `Parser::load` recurses once per
        // level of nesting, and a few thousand levels (`- - - …`, 20 KB) overflowed a 2 MiB
        // thread stack, an abort that took the whole process down.
        let too_deep = |line: usize, col: usize| SpecError {
            line,
            column: col + 1,
            field: String::new(),
            message: format!("the document is nested more than {MAX_DEPTH} levels deep"),
        };
        let scanned = loop {
            match parser.next_token() {
                Ok((Event::StreamEnd | Event::DocumentEnd, _)) => break Ok(()),
                Ok((ev, mark)) => {
                    builder.on_event(ev, mark);
                    if builder.stack.len() > MAX_DEPTH {
                        return Err(too_deep(mark.line(), mark.col()));
                    }
                }
                Err(e) => break Err(e),
            }
        };
        match scanned {
            Ok(()) => Ok(builder.index),
            // The scanner reads ahead, so `[[[[…` hits its own limit of 255 flow levels before
            // the events reach ours; serde_yaml would take seconds to say the same.
            Err(scan) if scan.info() == "recursion limit exceeded" => {
                Err(too_deep(scan.marker().line(), scan.marker().col()))
            }
            // Prefer serde_yaml's wording for syntax errors; fall back to ours if it accepts
            // what yaml-rust2 refused.
            Err(scan) => match serde_yaml::from_str::<serde_yaml::Value>(text) {
                Err(e) => Err(from_serde(
                    &e,
                    &PositionIndex { positions: BTreeMap::new(), duplicate: None, has_content: false },
                )),
                Ok(_) => Err(SpecError {
                    line: scan.marker().line(),
                    column: scan.marker().col() + 1,
                    field: String::new(),
                    message: format!("YAML syntax error: {}", scan.info()),
                }),
            },
        }
    }

    fn is_empty(&self) -> bool {
        !self.has_content
    }

    /// Position of `path`, or of its nearest ancestor that exists in the document.
    fn locate(&self, path: &str) -> (usize, usize) {
        let mut p = path.to_string();
        loop {
            if let Some(&pos) = self.positions.get(&p) {
                return pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None if !p.is_empty() => p.clear(),
                None => return (1, 1),
            }
        }
    }
}

/// The spec as it will run: every field written out, the defaults the text left out filled in,
/// in the spec's own YAML schema (it parses back to the same spec). What `sweep validate
/// --resolved` and `sweep status --spec` print, so that a silently defaulted field (a missing
/// `final_lr`, a missing `training:` section) is seen.
pub fn resolved_yaml(spec: &SweepSpec) -> String {
    use serde_yaml::{Mapping, Value};
    fn map(pairs: Vec<(&str, Value)>) -> Value {
        Value::Mapping(pairs.into_iter().map(|(k, v)| (Value::from(k), v)).collect::<Mapping>())
    }
    let dataset = |d: &DatasetSpec| match d {
        DatasetSpec::Synthetic { classes, train_per_class, val_per_class, image_size, seed } => map(vec![
            ("kind", "synthetic".into()),
            ("classes", (*classes).into()),
            ("train_per_class", (*train_per_class).into()),
            ("val_per_class", (*val_per_class).into()),
            ("image_size", (*image_size).into()),
            ("seed", (*seed).into()),
        ]),
        DatasetSpec::ImageFolder { root, image_size, skip_corrupt } => map(vec![
            ("kind", "image_folder".into()),
            ("root", root.as_str().into()),
            ("image_size", (*image_size).into()),
            ("skip_corrupt", (*skip_corrupt).into()),
        ]),
        DatasetSpec::Flowers102 { root, train_split, val_split, image_size, skip_corrupt } => {
            let splits = |s: &[FlowersSplit]| Value::Sequence(s.iter().map(|x| x.name().into()).collect());
            map(vec![
                ("kind", "flowers102".into()),
                ("root", root.as_str().into()),
                ("train_split", splits(train_split)),
                ("val_split", splits(val_split)),
                ("image_size", (*image_size).into()),
                ("skip_corrupt", (*skip_corrupt).into()),
            ])
        }
    };
    let t = &spec.training;
    let weights = match &spec.model.weights {
        Weights::None => "none".to_string(),
        Weights::ImageNet => "imagenet".to_string(),
        Weights::File(path) => path.clone(),
    };
    let lr = |d: &LrDecay| match d {
        LrDecay::Linear { head_lr, final_lr } => {
            map(vec![("strategy", "linear".into()), ("head_lr", (*head_lr).into()), ("final_lr", (*final_lr).into())])
        }
        LrDecay::Exponential { head_lr, factor } => {
            map(vec![("strategy", "exponential".into()), ("head_lr", (*head_lr).into()), ("factor", (*factor).into())])
        }
    };
    let mut doc = vec![
        ("name", spec.name.as_str().into()),
        ("dataset", dataset(&spec.dataset)),
        ("model", map(vec![("weights", weights.into())])),
        (
            "training",
            map(vec![
                ("batch_size", t.batch_size.into()),
                ("optimizer", Optimizer::ALL.iter().find(|(_, o)| *o == t.optimizer).map_or("adam", |(n, _)| n).into()),
                ("weight_decay", t.weight_decay.into()),
                ("seed", t.seed.into()),
                (
                    "feature_extraction",
                    map(vec![("lr", t.feature_extraction_lr.into()), ("augment", t.feature_extraction_augment.into())]),
                ),
                ("fine_tuning", map(vec![("default_lr", t.fine_tuning_default_lr.into())])),
                ("freeze_bn_stats", t.freeze_bn_stats.into()),
                (
                    "augment",
                    map(vec![
                        ("hflip", t.augment.hflip.into()),
                        ("rotation_deg", t.augment.rotation_deg.into()),
                        ("shear_deg", t.augment.shear_deg.into()),
                        ("color_jitter", t.augment.color_jitter.into()),
                    ]),
                ),
            ]),
        ),
        (
            "grid",
            map(vec![
                ("backbone", Value::Sequence(spec.grid.backbone.iter().map(|b| b.name().into()).collect())),
                ("lr_decay", Value::Sequence(spec.grid.lr_decay.iter().map(lr).collect())),
                (
                    "epoch_split",
                    Value::Sequence(
                        spec.grid
                            .epoch_split
                            .iter()
                            .map(|(fe, ft)| Value::Sequence(vec![(*fe).into(), (*ft).into()]))
                            .collect(),
                    ),
                ),
            ]),
        ),
        ("resources", map(vec![("gpus_per_trial", spec.resources.gpus_per_trial.into())])),
        ("retries", map(vec![("max_attempts", spec.retries.max_attempts.into())])),
    ];
    if let Some(p) = &spec.pretrain {
        doc.push((
            "pretrain",
            map(vec![
                ("dataset", dataset(&p.dataset)),
                ("epochs", p.epochs.into()),
                ("lr", p.lr.into()),
                ("batch_size", p.batch_size.into()),
                ("seed", p.seed.into()),
            ]),
        ));
    }
    if let Some(e) = &spec.early_stopping {
        let mut fields = vec![];
        match e.strategy {
            Strategy::Asha { eta } => fields.extend([("strategy", "asha".into()), ("eta", eta.into())]),
            Strategy::Median { min_trials } => {
                fields.extend([("strategy", "median".into()), ("min_trials", min_trials.into())])
            }
        }
        fields.extend([("metric", e.metric.name().into()), ("min_epochs", e.min_epochs.into())]);
        doc.push(("early_stopping", map(fields)));
    }
    doc.push(("sharing", if spec.sharing { "on" } else { "off" }.into()));
    serde_yaml::to_string(&map(doc)).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Raw document (what serde sees)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    dataset: RawDataset,
    #[serde(default)]
    model: Option<RawModel>,
    #[serde(default)]
    training: Option<RawTraining>,
    grid: RawGrid,
    #[serde(default)]
    resources: Option<RawResources>,
    #[serde(default)]
    retries: Option<RawRetries>,
    #[serde(default)]
    pretrain: Option<RawPretrain>,
    #[serde(default)]
    early_stopping: Option<RawEarlyStopping>,
    #[serde(default)]
    sharing: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEarlyStopping {
    strategy: String,
    metric: Option<String>,
    eta: Option<i64>,
    min_epochs: Option<i64>,
    min_trials: Option<i64>,
}

impl RawEarlyStopping {
    fn validate(self, grid: &GridSpec) -> Result<EarlyStopping, Invalid> {
        let f = |name: &str| format!("early_stopping.{name}");
        let metric = match &self.metric {
            Some(m) => one_of(&f("metric"), "metric", m, &Metric::ALL)?,
            None => Metric::ValAccuracy,
        };
        let min_epochs = match self.min_epochs {
            Some(n) => positive_int(&f("min_epochs"), n, 100_000)?,
            None => 1,
        };
        let strategy = match self.strategy.as_str() {
            "asha" => {
                if self.min_trials.is_some() {
                    return err(f("min_trials"), "belongs to `strategy: median`; ASHA takes `eta`");
                }
                let eta = match self.eta {
                    Some(e) if e < 2 => {
                        return err(f("eta"), format!("must be at least 2 (keep the top 1/eta), got {e}"));
                    }
                    Some(e) => positive_int(&f("eta"), e, 1000)?,
                    None => 3,
                };
                Strategy::Asha { eta }
            }
            "median" => {
                if self.eta.is_some() {
                    return err(f("eta"), "belongs to `strategy: asha`; the median rule takes `min_trials`");
                }
                Strategy::Median {
                    min_trials: match self.min_trials {
                        Some(n) => positive_int(&f("min_trials"), n, 100_000)?,
                        None => 3,
                    },
                }
            }
            other => {
                return err(f("strategy"), format!("unknown strategy `{other}`; valid: asha, median"));
            }
        };
        if let Some(longest) = grid.epoch_split.iter().map(|(_, ft)| *ft).max()
            && min_epochs >= longest
        {
            return err(
                f("min_epochs"),
                format!(
                    "is {min_epochs}, but no trial has more than {longest} fine-tuning epochs: nothing would ever be \
                     decided (decisions are taken before a trial's last epoch)"
                ),
            );
        }
        Ok(EarlyStopping { strategy, metric, min_epochs })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPretrain {
    dataset: RawDataset,
    epochs: i64,
    lr: Option<f64>,
    batch_size: Option<i64>,
    seed: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    kind: String,
    root: Option<String>,
    image_size: Option<i64>,
    classes: Option<i64>,
    train_per_class: Option<i64>,
    val_per_class: Option<i64>,
    seed: Option<i64>,
    train_split: Option<Vec<String>>,
    val_split: Option<Vec<String>>,
    skip_corrupt: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    weights: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTraining {
    batch_size: Option<i64>,
    optimizer: Option<String>,
    weight_decay: Option<f64>,
    seed: Option<i64>,
    feature_extraction: Option<RawFeatureExtraction>,
    fine_tuning: Option<RawFineTuning>,
    freeze_bn_stats: Option<bool>,
    augment: Option<RawAugment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeatureExtraction {
    lr: Option<f64>,
    augment: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFineTuning {
    default_lr: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAugment {
    hflip: Option<bool>,
    rotation_deg: Option<f64>,
    shear_deg: Option<f64>,
    color_jitter: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrid {
    backbone: Vec<String>,
    lr_decay: Vec<RawLrDecay>,
    epoch_split: Vec<Vec<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLrDecay {
    strategy: String,
    head_lr: Option<f64>,
    final_lr: Option<f64>,
    factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    gpus_per_trial: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetries {
    max_attempts: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Validation: raw -> typed. Errors are (field path, message).
// ---------------------------------------------------------------------------------------------

type Invalid = (String, String);

fn err<T>(field: impl Into<String>, message: impl Into<String>) -> Result<T, Invalid> {
    Err((field.into(), message.into()))
}

fn positive_int(field: &str, v: i64, max: i64) -> Result<u32, Invalid> {
    if v < 1 {
        return err(field, format!("must be a whole number of at least 1, got {v}"));
    }
    if v > max {
        return err(field, format!("must be at most {max}, got {v}"));
    }
    Ok(v as u32)
}

fn positive_float(field: &str, v: f64) -> Result<f64, Invalid> {
    if !v.is_finite() || v <= 0.0 {
        return err(field, format!("must be a number greater than 0, got {v}"));
    }
    Ok(v)
}

fn non_negative_float(field: &str, v: f64, max: f64) -> Result<f64, Invalid> {
    if !v.is_finite() || v < 0.0 {
        return err(field, format!("must be a number of at least 0, got {v}"));
    }
    if v > max {
        return err(field, format!("must be at most {max}, got {v}"));
    }
    Ok(v)
}

fn seed(field: &str, v: i64) -> Result<u64, Invalid> {
    u64::try_from(v).or_else(|_| err(field, format!("must be 0 or a positive whole number, got {v}")))
}

fn one_of<T: Copy>(field: &str, what: &str, value: &str, choices: &[(&str, T)]) -> Result<T, Invalid> {
    choices.iter().find(|(n, _)| *n == value).map(|(_, t)| *t).ok_or_else(|| {
        let valid: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        (field.to_string(), format!("unknown {what} `{value}`; valid: {}", valid.join(", ")))
    })
}

/// Most memory a synthetic dataset's decoded images may take (a worker holds them all).
pub const MAX_SYNTHETIC_BYTES: u128 = 64 << 30;

/// Longest sweep name accepted (it is shown in every list and table).
pub const MAX_NAME_CHARS: usize = 200;

/// Largest image side we accept; far above any backbone's training size.
const MAX_IMAGE_SIZE: i64 = 4096;

impl RawSpec {
    fn validate(self, options: ParseOptions) -> Result<SweepSpec, Invalid> {
        if self.name.trim().is_empty() {
            return err("name", "must not be empty");
        }
        let chars = self.name.chars().count();
        if chars > MAX_NAME_CHARS && !options.stored {
            return err("name", format!("is {chars} characters long; at most {MAX_NAME_CHARS}"));
        }
        if self.name.chars().any(char::is_control) && !options.stored {
            return err("name", "must not contain control characters (line breaks, escapes)");
        }
        let dataset = self.dataset.validate("dataset", options)?;
        let model = self.model.unwrap_or_default().validate()?;
        let training = self.training.unwrap_or_default().validate()?;
        let grid = self.grid.validate(options)?;
        let resources = match self.resources {
            Some(RawResources { gpus_per_trial: Some(n) }) => {
                Resources { gpus_per_trial: positive_int("resources.gpus_per_trial", n, 1024)? }
            }
            _ => Resources { gpus_per_trial: 1 },
        };
        let retries = match self.retries {
            Some(RawRetries { max_attempts: Some(n) }) => {
                Retries { max_attempts: positive_int("retries.max_attempts", n, 1000)? }
            }
            _ => Retries { max_attempts: 3 },
        };
        if let Some(min) = grid.backbone.iter().map(|b| b.min_image_size()).max() {
            let size = dataset.image_size();
            if size < min {
                let b = grid.backbone.iter().find(|b| b.min_image_size() == min).map(|b| b.name()).unwrap_or("");
                return err(
                    "dataset.image_size",
                    format!("{size} px is too small for {b}, which needs at least {min} px"),
                );
            }
        }
        let pretrain = match self.pretrain {
            None => None,
            Some(p) => {
                if model.weights != Weights::None {
                    return err(
                        "model.weights",
                        "a spec with `pretrain` starts from the weights its pretraining produces; remove model.weights (or pretrain)",
                    );
                }
                let dataset = p.dataset.validate("pretrain.dataset", options)?;
                if let Some(b) = grid.backbone.iter().find(|b| dataset.image_size() < b.min_image_size()) {
                    return err(
                        "pretrain.dataset.image_size",
                        format!(
                            "{} px is too small for {}, which needs at least {} px",
                            dataset.image_size(),
                            b.name(),
                            b.min_image_size()
                        ),
                    );
                }
                Some(PretrainSpec {
                    dataset,
                    epochs: positive_int("pretrain.epochs", p.epochs, 100_000)?,
                    lr: positive_float("pretrain.lr", p.lr.unwrap_or(1e-3))?,
                    batch_size: match p.batch_size {
                        Some(b) => positive_int("pretrain.batch_size", b, 65_536)?,
                        None => training.batch_size,
                    },
                    seed: match p.seed {
                        Some(v) => seed("pretrain.seed", v)?,
                        None => training.seed,
                    },
                })
            }
        };
        let early_stopping = self.early_stopping.map(|e| e.validate(&grid)).transpose()?;
        let sharing = match &self.sharing {
            None => true,
            Some(serde_yaml::Value::Bool(b)) => *b,
            Some(serde_yaml::Value::String(s)) if s == "on" => true,
            Some(serde_yaml::Value::String(s)) if s == "off" => false,
            Some(other) => {
                let shown = match other {
                    serde_yaml::Value::Sequence(_) => "a list".to_string(),
                    serde_yaml::Value::Mapping(_) => "a mapping".to_string(),
                    serde_yaml::Value::Null => "nothing".to_string(),
                    v => format!("`{}`", serde_yaml::to_string(v).unwrap_or_default().trim()),
                };
                return err("sharing", format!("must be `on` or `off`, got {shown}"));
            }
        };
        Ok(SweepSpec {
            name: self.name,
            dataset,
            model,
            training,
            grid,
            resources,
            retries,
            pretrain,
            early_stopping,
            sharing,
        })
    }
}

impl RawDataset {
    /// Validates a dataset mapping found at field path `at` (`dataset`, `pretrain.dataset`).
    fn validate(self, at: &str, options: ParseOptions) -> Result<DatasetSpec, Invalid> {
        let f = |key: &str| format!("{at}.{key}");
        const KINDS: [(&str, u8); 3] = [("synthetic", 0), ("image_folder", 1), ("flowers102", 2)];
        let kind = one_of(&f("kind"), "dataset kind", &self.kind, &KINDS)?;
        // Which keys each kind takes; any other key given is an error.
        let allowed: &[&str] = match kind {
            0 => &["classes", "train_per_class", "val_per_class", "image_size", "seed"],
            1 => &["root", "image_size", "skip_corrupt"],
            _ => &["root", "train_split", "val_split", "image_size", "skip_corrupt"],
        };
        let given = [
            ("root", self.root.is_some()),
            ("image_size", self.image_size.is_some()),
            ("classes", self.classes.is_some()),
            ("train_per_class", self.train_per_class.is_some()),
            ("val_per_class", self.val_per_class.is_some()),
            ("seed", self.seed.is_some()),
            ("train_split", self.train_split.is_some()),
            ("val_split", self.val_split.is_some()),
            ("skip_corrupt", self.skip_corrupt.is_some()),
        ];
        for (key, present) in given {
            if present && !allowed.contains(&key) {
                return err(
                    f(key),
                    format!("not a setting of dataset kind `{}`; it takes: kind, {}", self.kind, allowed.join(", ")),
                );
            }
        }
        let image_size = match self.image_size {
            Some(v) => positive_int(&f("image_size"), v, MAX_IMAGE_SIZE)?,
            None if kind == 0 => 32,
            None => 224,
        };
        let root = |r: Option<String>| match r {
            Some(r) if !r.trim().is_empty() => Ok(r),
            Some(_) => err(f("root"), "must not be empty"),
            None => err(at, format!("missing field `root` (dataset kind `{}` reads its images from it)", self.kind)),
        };
        Ok(match kind {
            0 => {
                let dataset = DatasetSpec::Synthetic {
                    classes: positive_int(&f("classes"), self.classes.unwrap_or(10), 100_000)?,
                    train_per_class: positive_int(
                        &f("train_per_class"),
                        self.train_per_class.unwrap_or(32),
                        1_000_000,
                    )?,
                    val_per_class: positive_int(&f("val_per_class"), self.val_per_class.unwrap_or(16), 1_000_000)?,
                    image_size,
                    seed: seed(&f("seed"), self.seed.unwrap_or(0))?,
                };
                // Every worker that takes a trial decodes the whole set into memory.
                if let Some(bytes) = dataset.estimated_bytes()
                    && bytes > MAX_SYNTHETIC_BYTES
                    && !options.stored
                {
                    return err(
                        at,
                        format!(
                            "the synthetic images would take {:.1} GiB of every worker's memory; at most {} GiB \
                             (fewer classes, images per class or pixels)",
                            bytes as f64 / (1u64 << 30) as f64,
                            MAX_SYNTHETIC_BYTES >> 30
                        ),
                    );
                }
                dataset
            }
            1 => DatasetSpec::ImageFolder {
                root: root(self.root)?,
                image_size,
                skip_corrupt: self.skip_corrupt.unwrap_or(false),
            },
            _ => {
                let splits = |field: &str,
                              v: Option<Vec<String>>,
                              default: &[FlowersSplit]|
                 -> Result<Vec<FlowersSplit>, Invalid> {
                    let Some(v) = v else { return Ok(default.to_vec()) };
                    if v.is_empty() {
                        return err(field, "must list at least one of train, val, test");
                    }
                    let mut out = Vec::new();
                    for (i, s) in v.iter().enumerate() {
                        let f = format!("{field}[{i}]");
                        let split = one_of(&f, "split", s, &FlowersSplit::ALL)?;
                        if out.contains(&split) {
                            return err(f, format!("split `{s}` is listed twice"));
                        }
                        out.push(split);
                    }
                    Ok(out)
                };
                // The guide's mapping: train on the 6,149-image test split, validate on the rest.
                let train_split = splits(&f("train_split"), self.train_split, &[FlowersSplit::Test])?;
                let val_split = splits(&f("val_split"), self.val_split, &[FlowersSplit::Train, FlowersSplit::Val])?;
                if let Some(s) = val_split.iter().find(|s| train_split.contains(s)) {
                    return err(
                        f("val_split"),
                        format!("split `{}` is also a training split; validation must use other images", s.name()),
                    );
                }
                DatasetSpec::Flowers102 {
                    root: root(self.root)?,
                    train_split,
                    val_split,
                    image_size,
                    skip_corrupt: self.skip_corrupt.unwrap_or(false),
                }
            }
        })
    }
}

impl RawModel {
    fn validate(self) -> Result<ModelSpec, Invalid> {
        let weights = match self.weights.as_deref() {
            None | Some("none") => Weights::None,
            Some("imagenet") => Weights::ImageNet,
            Some(path) if path.ends_with(".safetensors") && path.len() > ".safetensors".len() => {
                Weights::File(path.to_string())
            }
            Some(other) => {
                return err(
                    "model.weights",
                    format!("must be `none`, `imagenet` or a path to a .safetensors file, got `{other}`"),
                );
            }
        };
        Ok(ModelSpec { weights })
    }
}

impl RawTraining {
    fn validate(self) -> Result<TrainingSpec, Invalid> {
        let augment = match self.augment {
            None => Augment::default(),
            Some(a) => {
                let d = Augment::default();
                Augment {
                    hflip: a.hflip.unwrap_or(d.hflip),
                    rotation_deg: non_negative_float(
                        "training.augment.rotation_deg",
                        a.rotation_deg.unwrap_or(d.rotation_deg),
                        180.0,
                    )?,
                    shear_deg: non_negative_float(
                        "training.augment.shear_deg",
                        a.shear_deg.unwrap_or(d.shear_deg),
                        60.0,
                    )?,
                    color_jitter: non_negative_float(
                        "training.augment.color_jitter",
                        a.color_jitter.unwrap_or(d.color_jitter),
                        1.0,
                    )?,
                }
            }
        };
        Ok(TrainingSpec {
            batch_size: positive_int("training.batch_size", self.batch_size.unwrap_or(32), 65_536)?,
            optimizer: one_of(
                "training.optimizer",
                "optimizer",
                self.optimizer.as_deref().unwrap_or("adam"),
                &Optimizer::ALL,
            )?,
            weight_decay: non_negative_float("training.weight_decay", self.weight_decay.unwrap_or(0.0), 1.0)?,
            seed: seed("training.seed", self.seed.unwrap_or(0))?,
            feature_extraction_lr: positive_float(
                "training.feature_extraction.lr",
                self.feature_extraction.as_ref().and_then(|f| f.lr).unwrap_or(1e-3),
            )?,
            feature_extraction_augment: self.feature_extraction.as_ref().and_then(|f| f.augment).unwrap_or(true),
            fine_tuning_default_lr: positive_float(
                "training.fine_tuning.default_lr",
                self.fine_tuning.and_then(|f| f.default_lr).unwrap_or(1e-8),
            )?,
            freeze_bn_stats: self.freeze_bn_stats.unwrap_or(false),
            augment,
        })
    }
}

impl RawGrid {
    fn validate(self, options: ParseOptions) -> Result<GridSpec, Invalid> {
        for (field, len) in [
            ("grid.backbone", self.backbone.len()),
            ("grid.lr_decay", self.lr_decay.len()),
            ("grid.epoch_split", self.epoch_split.len()),
        ] {
            if len == 0 {
                return err(field, "must list at least one entry");
            }
        }
        let mut backbones = Vec::new();
        for (i, name) in self.backbone.iter().enumerate() {
            let field = format!("grid.backbone[{i}]");
            let b = Backbone::from_name(name).ok_or_else(|| {
                (field.clone(), format!("unknown backbone `{name}`; valid: {}", backbone::names().join(", ")))
            })?;
            if backbones.contains(&b) {
                return err(field, format!("backbone `{name}` is listed twice"));
            }
            backbones.push(b);
        }
        let mut decays = Vec::new();
        for (i, raw) in self.lr_decay.into_iter().enumerate() {
            let d = raw.validate(&format!("grid.lr_decay[{i}]"))?;
            if decays.contains(&d) {
                return err(format!("grid.lr_decay[{i}]"), "this strategy is listed twice");
            }
            decays.push(d);
        }
        let mut splits = Vec::new();
        let mut seen = HashSet::new();
        for (i, pair) in self.epoch_split.iter().enumerate() {
            let field = format!("grid.epoch_split[{i}]");
            if pair.len() != 2 {
                return err(
                    field,
                    format!("must be [feature-extraction epochs, fine-tuning epochs], got {} numbers", pair.len()),
                );
            }
            let fe = positive_int(&format!("{field}[0]"), pair[0], 100_000)?;
            let ft = positive_int(&format!("{field}[1]"), pair[1], 100_000)?;
            if !seen.insert((fe, ft)) {
                return err(field, format!("split [{fe}, {ft}] is listed twice"));
            }
            splits.push((fe, ft));
        }
        let grid = GridSpec { backbone: backbones, lr_decay: decays, epoch_split: splits };
        let n = grid.trial_count();
        if n > options.max_trials {
            return err(
                "grid",
                format!(
                    "{n} trials ({} backbones × {} lr_decay × {} epoch_split) is over the limit of {}",
                    grid.backbone.len(),
                    grid.lr_decay.len(),
                    grid.epoch_split.len(),
                    options.max_trials
                ),
            );
        }
        Ok(grid)
    }
}

impl RawLrDecay {
    fn validate(self, field: &str) -> Result<LrDecay, Invalid> {
        const STRATEGIES: [(&str, u8); 2] = [("linear", 0), ("exponential", 1)];
        let kind = one_of(&format!("{field}.strategy"), "strategy", &self.strategy, &STRATEGIES)?;
        let head_lr = positive_float(&format!("{field}.head_lr"), self.head_lr.unwrap_or(1e-4))?;
        let forbid = |key: &str, present: bool| -> Result<(), Invalid> {
            if present {
                return err(format!("{field}.{key}"), format!("not a setting of strategy `{}`", self.strategy));
            }
            Ok(())
        };
        match kind {
            0 => {
                forbid("factor", self.factor.is_some())?;
                let final_lr = positive_float(&format!("{field}.final_lr"), self.final_lr.unwrap_or(head_lr / 1000.0))?;
                Ok(LrDecay::Linear { head_lr, final_lr })
            }
            _ => {
                forbid("final_lr", self.final_lr.is_some())?;
                let factor = self.factor.unwrap_or(3.0);
                if !factor.is_finite() || factor < 1.0 {
                    return err(
                        format!("{field}.factor"),
                        format!(
                            "must be a number of at least 1 (the learning rate is divided by it at each layer group), got {factor}"
                        ),
                    );
                }
                Ok(LrDecay::Exponential { head_lr, factor })
            }
        }
    }
}

/// Values to add to a sweep's grid (`sweep extend`): backbone names, learning-rate strategies
/// (each a YAML mapping, as in a spec: `{ strategy: linear, head_lr: 1.0e-4 }`) and epoch
/// splits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GridAdditions {
    pub backbones: Vec<String>,
    pub lr_decays: Vec<String>,
    pub epoch_splits: Vec<(u32, u32)>,
}

impl GridAdditions {
    pub fn is_empty(&self) -> bool {
        self.backbones.is_empty() && self.lr_decays.is_empty() && self.epoch_splits.is_empty()
    }
}

/// The stored spec `yaml` with `add`'s values appended to its grid lists (everything else as it
/// was), and the parsed result: a grid holding every cell of the old one and more. A value
/// already in the grid (the parser refuses a value listed twice), one that does not parse, or
/// a spec whose grid is not three lists is an error that names it.
pub fn extend_grid(yaml: &str, add: &GridAdditions, options: ParseOptions) -> Result<(String, SweepSpec), String> {
    if add.is_empty() {
        return Err("nothing to add: give --backbone, --lr-decay or --epoch-split".into());
    }
    let yaml = yaml.strip_prefix('\u{feff}').unwrap_or(yaml);
    parse_with(yaml, options).map_err(|e| format!("the sweep's own spec does not parse: {e}"))?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
    let grid = doc
        .get_mut("grid")
        .and_then(serde_yaml::Value::as_mapping_mut)
        .ok_or("the sweep's spec has no `grid` mapping")?;
    let mut push = |list: &str, value: serde_yaml::Value| -> Result<(), String> {
        grid.get_mut(list)
            .and_then(serde_yaml::Value::as_sequence_mut)
            .ok_or_else(|| format!("the sweep's grid has no `{list}` list"))?
            .push(value);
        Ok(())
    };
    for b in &add.backbones {
        push("backbone", serde_yaml::Value::String(b.clone()))?;
    }
    for d in &add.lr_decays {
        let value: serde_yaml::Value =
            serde_yaml::from_str(d).map_err(|e| format!("--lr-decay `{d}` is not YAML: {e}"))?;
        if !value.is_mapping() {
            return Err(format!(
                "--lr-decay `{d}` must be a mapping, such as `{{ strategy: linear, head_lr: 1.0e-4, final_lr: 1.0e-7 }}`"
            ));
        }
        push("lr_decay", value)?;
    }
    for (fe, ft) in &add.epoch_splits {
        push("epoch_split", serde_yaml::Value::Sequence(vec![(*fe).into(), (*ft).into()]))?;
    }
    let text = serde_yaml::to_string(&doc).map_err(|e| e.to_string())?;
    // Positions in the generated text mean nothing to whoever typed the values: the field and
    // the message say which value is wrong.
    let new = parse_with(&text, options)
        .map_err(|e| format!("the extended grid is not valid: {}: {}", e.field, e.message))?;
    Ok((text, new))
}
