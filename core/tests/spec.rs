//! Spec validation: every kind of bad spec gets one error with line, column and field.

use sweep_core::backbone::Backbone;
use sweep_core::lr::LrDecay;
use sweep_core::spec::{self, DatasetSpec, FlowersSplit, ParseOptions, SpecError, Weights};

const GOOD: &str = "\
name: t
dataset:
  kind: synthetic
  classes: 4
grid:
  backbone: [resnet18, resnet50]
  lr_decay:
    - { strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-6 }
  epoch_split: [[2, 1], [1, 2]]
";

fn error(text: &str) -> SpecError {
    match spec::parse(text) {
        Ok(s) => panic!("spec was accepted: {s:?}\n{text}"),
        Err(e) => e,
    }
}

/// Asserts the error's position, field and a fragment of its message.
fn assert_error(text: &str, line: usize, column: usize, field: &str, fragment: &str) {
    let e = error(text);
    assert_eq!((e.line, e.column, e.field.as_str()), (line, column, field), "{e}");
    assert!(e.message.contains(fragment), "message `{}` lacks `{fragment}`", e.message);
}

#[test]
fn shipped_specs_parse() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps");
    let flowers = spec::parse(&std::fs::read_to_string(format!("{root}/flowers102.yaml")).unwrap()).unwrap();
    assert_eq!(flowers.name, "flowers102-transfer");
    assert_eq!(
        flowers.dataset,
        DatasetSpec::Flowers102 {
            root: "/data/flowers-102".into(),
            train_split: vec![FlowersSplit::Test],
            val_split: vec![FlowersSplit::Train, FlowersSplit::Val],
            image_size: 224,
            skip_corrupt: false,
        }
    );
    assert_eq!(flowers.model.weights, Weights::ImageNet);
    assert_eq!(flowers.grid.backbone, vec![Backbone::Vgg16Bn, Backbone::Resnet50, Backbone::Resnet152]);
    assert_eq!(
        flowers.grid.lr_decay,
        vec![LrDecay::Linear { head_lr: 1e-4, final_lr: 1e-7 }, LrDecay::Exponential { head_lr: 1e-4, factor: 3.0 }]
    );
    assert_eq!(flowers.grid.epoch_split, vec![(16, 8), (12, 12), (8, 16)]);
    assert_eq!(flowers.grid.trial_count(), 18);
    assert_eq!(flowers.training.feature_extraction_lr, 1e-3);
    assert_eq!(flowers.training.fine_tuning_default_lr, 1e-8);
    assert_eq!(flowers.retries.max_attempts, 3);

    let quick = spec::parse(&std::fs::read_to_string(format!("{root}/quickstart.yaml")).unwrap()).unwrap();
    assert!(quick.grid.trial_count() >= 8);
    assert!(quick.grid.backbone.len() >= 2 && quick.grid.lr_decay.len() >= 2 && quick.grid.epoch_split.len() >= 2);
    assert_eq!(quick.dataset.kind(), "synthetic");
}

#[test]
fn defaults_fill_what_is_left_out() {
    let s = spec::parse(GOOD).unwrap();
    assert_eq!(s.training.batch_size, 32);
    assert_eq!(s.training.seed, 0);
    assert_eq!(s.model.weights, Weights::None);
    assert_eq!(s.resources.gpus_per_trial, 1);
    assert_eq!(s.retries.max_attempts, 3);
    assert!(!s.training.freeze_bn_stats);
    assert!(s.training.feature_extraction_augment, "the recipe augments both phases");
    match s.dataset {
        DatasetSpec::Synthetic { classes, image_size, .. } => assert_eq!((classes, image_size), (4, 32)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn yaml_syntax_error() {
    assert_error("name: t\ndataset: {kind: synthetic\ngrid: []\n", 3, 5, "", "did not find expected");
    let e = error("name: t\n  bad: indentation\n");
    assert_eq!(e.line, 2, "{e}");
}

#[test]
fn empty_file() {
    assert_error("", 1, 1, "", "empty");
    assert_error("# only a comment\n\n", 1, 1, "", "empty");
    assert_error("---\n", 1, 1, "", "empty");
}

#[test]
fn unknown_keys() {
    assert_error(&format!("{GOOD}bogus: 1\n"), 10, 1, "", "unknown field `bogus`");
    let text = GOOD.replace("  classes: 4\n", "  classes: 4\n  colour: red\n");
    assert_error(&text, 5, 3, "dataset", "unknown field `colour`");
    let text = GOOD.replace("head_lr: 1.0e-3,", "head_lr: 1.0e-3, warmup: 2,");
    assert_error(&text, 8, 44, "grid.lr_decay[0]", "unknown field `warmup`");
    // A key that exists, but not for this dataset kind.
    let text = GOOD.replace("  classes: 4\n", "  classes: 4\n  root: /data\n");
    assert_error(&text, 5, 9, "dataset.root", "not a setting of dataset kind `synthetic`");
}

#[test]
fn wrong_types() {
    assert_error(&GOOD.replace("classes: 4", "classes: four"), 4, 12, "dataset.classes", "invalid type");
    assert_error(
        &GOOD.replace("backbone: [resnet18, resnet50]", "backbone: resnet18"),
        6,
        13,
        "grid.backbone",
        "invalid type",
    );
    assert_error(&GOOD.replace("head_lr: 1.0e-3", "head_lr: fast"), 8, 36, "grid.lr_decay[0].head_lr", "invalid type");
    assert_error(&format!("{GOOD}training: {{ batch_size: 3.5 }}\n"), 10, 25, "training.batch_size", "invalid type");
    assert_error(
        &format!("{GOOD}training: {{ feature_extraction: {{ augment: 3 }} }}\n"),
        10,
        44,
        "training.feature_extraction.augment",
        "invalid type",
    );
    assert_error("- a\n- b\n", 1, 1, "", "invalid type");
}

#[test]
fn missing_fields() {
    assert_error(&GOOD.replace("name: t\n", ""), 1, 1, "", "missing field `name`");
    let e = error(&GOOD.replace("  epoch_split: [[2, 1], [1, 2]]\n", ""));
    assert!(e.message.contains("missing field `epoch_split`"), "{e}");
    assert_eq!((e.line, e.column, e.field.as_str()), (5, 1, "grid"), "{e}");
    assert_error(
        "name: t\ndataset:\n  kind: image_folder\ngrid: {backbone: [resnet18], lr_decay: [{strategy: linear}], epoch_split: [[1, 1]]}\n",
        2,
        1,
        "dataset",
        "missing field `root`",
    );
}

#[test]
fn empty_lists() {
    assert_error(&GOOD.replace("[resnet18, resnet50]", "[]"), 6, 3, "grid.backbone", "at least one");
    assert_error(&GOOD.replace("[[2, 1], [1, 2]]", "[]"), 9, 3, "grid.epoch_split", "at least one");
    let text = GOOD
        .replace("  lr_decay:\n    - { strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-6 }\n", "  lr_decay: []\n");
    assert_error(&text, 7, 3, "grid.lr_decay", "at least one");
}

#[test]
fn zero_or_negative_numbers() {
    assert_error(
        &GOOD.replace("[[2, 1], [1, 2]]", "[[2, 1], [0, 2]]"),
        9,
        26,
        "grid.epoch_split[1][0]",
        "at least 1, got 0",
    );
    assert_error(&GOOD.replace("[[2, 1], [1, 2]]", "[[2, -1]]"), 9, 21, "grid.epoch_split[0][1]", "at least 1, got -1");
    assert_error(&GOOD.replace("[[2, 1], [1, 2]]", "[[2, 1, 3]]"), 9, 17, "grid.epoch_split[0]", "got 3 numbers");
    assert_error(&format!("{GOOD}training:\n  batch_size: 0\n"), 11, 15, "training.batch_size", "at least 1, got 0");
    assert_error(&GOOD.replace("head_lr: 1.0e-3", "head_lr: 0"), 8, 36, "grid.lr_decay[0].head_lr", "greater than 0");
    assert_error(
        &GOOD.replace("final_lr: 1.0e-6", "final_lr: -1.0e-6"),
        8,
        54,
        "grid.lr_decay[0].final_lr",
        "greater than 0",
    );
    assert_error(
        &format!("{GOOD}training:\n  feature_extraction: {{ lr: -0.1 }}\n"),
        11,
        29,
        "training.feature_extraction.lr",
        "greater than 0",
    );
    assert_error(
        &format!("{GOOD}training:\n  fine_tuning: {{ default_lr: 0.0 }}\n"),
        11,
        30,
        "training.fine_tuning.default_lr",
        "greater than 0",
    );
    assert_error(&GOOD.replace("classes: 4", "classes: 0"), 4, 12, "dataset.classes", "at least 1");
    assert_error(
        &format!("{GOOD}resources: {{ gpus_per_trial: 0 }}\n"),
        10,
        30,
        "resources.gpus_per_trial",
        "at least 1",
    );
    assert_error(&format!("{GOOD}retries: {{ max_attempts: -2 }}\n"), 10, 26, "retries.max_attempts", "at least 1");
    assert_error(&format!("{GOOD}training: {{ weight_decay: -1 }}\n"), 10, 27, "training.weight_decay", "at least 0");
}

#[test]
fn unknown_backbone_lists_the_valid_ones() {
    let e = error(&GOOD.replace("[resnet18, resnet50]", "[resnet18, resnet05]"));
    assert_eq!((e.line, e.column, e.field.as_str()), (6, 24, "grid.backbone[1]"), "{e}");
    assert!(e.message.contains("unknown backbone `resnet05`"), "{e}");
    for name in sweep_core::backbone::names() {
        assert!(e.message.contains(name), "{e}");
    }
}

#[test]
fn unknown_strategy_lists_the_valid_ones() {
    assert_error(
        &GOOD.replace("strategy: linear", "strategy: cosine"),
        8,
        19,
        "grid.lr_decay[0].strategy",
        "unknown strategy `cosine`; valid: linear, exponential",
    );
    assert_error(
        &GOOD.replace("final_lr: 1.0e-6", "factor: 2"),
        8,
        52,
        "grid.lr_decay[0].factor",
        "not a setting of strategy `linear`",
    );
}

#[test]
fn other_impossible_values() {
    assert_error(
        &GOOD.replace("kind: synthetic", "kind: imagenet"),
        3,
        9,
        "dataset.kind",
        "valid: synthetic, image_folder, flowers102",
    );
    assert_error(&format!("{GOOD}model: {{ weights: resnet.pth }}\n"), 10, 19, "model.weights", ".safetensors");
    assert_error(&format!("{GOOD}training: {{ optimizer: sgd }}\n"), 10, 24, "training.optimizer", "valid: adam");
    assert_error(
        &GOOD.replace("[resnet18, resnet50]", "[resnet18, resnet18]"),
        6,
        24,
        "grid.backbone[1]",
        "listed twice",
    );
    assert_error(&GOOD.replace("classes: 4", "classes: 4\n  image_size: 16"), 5, 15, "dataset.image_size", "too small");
    let flowers = "name: f\ndataset:\n  kind: flowers102\n  root: /d\n  train_split: [train]\n  val_split: [val, train]\ngrid: {backbone: [resnet18], lr_decay: [{strategy: linear}], epoch_split: [[1, 1]]}\n";
    assert_error(flowers, 6, 3, "dataset.val_split", "also a training split");
    assert_error(
        &flowers.replace("[val, train]", "[validation]"),
        6,
        15,
        "dataset.val_split[0]",
        "unknown split `validation`",
    );
}

#[test]
fn grid_over_the_limit() {
    let text = GOOD.replace("[[2, 1], [1, 2]]", "[[1, 1], [1, 2], [1, 3]]");
    let e = spec::parse_with(&text, ParseOptions::with_max_trials(5)).unwrap_err();
    assert_eq!((e.line, e.column, e.field.as_str()), (5, 1, "grid"), "{e}");
    assert!(e.message.contains("6 trials") && e.message.contains("limit of 5"), "{e}");
    assert!(spec::parse_with(&text, ParseOptions::with_max_trials(6)).is_ok());

    // The default limit is 10,000.
    let splits: Vec<String> = (1..=2001).map(|i| format!("[{i}, 1]")).collect();
    let big = GOOD
        .replace("[[2, 1], [1, 2]]", &format!("[{}]", splits.join(", ")))
        .replace("[resnet18, resnet50]", "[resnet18, resnet50, resnet34, resnet101, resnet152]");
    let e = error(&big);
    assert!(e.message.contains("10005 trials") && e.message.contains("limit of 10000"), "{e}");
}

#[test]
fn errors_display_line_column_and_field() {
    let e = error(&GOOD.replace("classes: 4", "classes: 0"));
    assert_eq!(e.to_string(), "line 4, column 12: dataset.classes: must be a whole number of at least 1, got 0");
}

#[test]
fn garbage_never_panics() {
    for text in [
        "\0",
        "{",
        "[",
        "name: [",
        ": :",
        "&a [*a]",
        "name: &x t\ndataset: *x\n",
        "!!binary foo",
        "---\n---\n",
        "name: t\ndataset: {kind: synthetic}\ngrid: {backbone: [resnet18], lr_decay: [{strategy: linear}], epoch_split: [[1e99, 1]]}\n",
        "name: t\ndataset: {kind: synthetic, classes: 99999999999999999999999}\n",
    ] {
        assert!(spec::parse(text).is_err(), "{text:?}");
    }
}

#[test]
fn pretraining_section() {
    let text = format!(
        "{GOOD}training: {{ batch_size: 16, seed: 4 }}\npretrain:\n  dataset: {{ kind: synthetic, classes: 20, seed: 9 }}\n  epochs: 3\n"
    );
    let s = spec::parse(&text).unwrap();
    let p = s.pretrain.expect("pretrain");
    assert_eq!((p.epochs, p.lr, p.batch_size, p.seed), (3, 1e-3, 16, 4), "defaults from training");
    match p.dataset {
        DatasetSpec::Synthetic { classes, seed, .. } => assert_eq!((classes, seed), (20, 9)),
        other => panic!("{other:?}"),
    }
    assert!(spec::parse(GOOD).unwrap().pretrain.is_none());

    // Errors inside the pretraining dataset name their own path.
    let bad = text.replace("classes: 20", "classes: 0");
    assert_error(&bad, 12, 40, "pretrain.dataset.classes", "at least 1");
    let bad = text.replace("kind: synthetic, classes: 20, seed: 9", "kind: image_folder");
    assert_error(&bad, 12, 3, "pretrain.dataset", "missing field `root`");
    assert_error(&text.replace("epochs: 3", "epochs: 0"), 13, 11, "pretrain.epochs", "at least 1");
    assert_error(&text.replace("  epochs: 3\n", ""), 11, 1, "pretrain", "missing field `epochs`");
    assert_error(&format!("{text}  warmup: 2\n"), 14, 3, "pretrain", "unknown field `warmup`");
    // Pretraining and given weights exclude each other.
    let both = format!("{text}model: {{ weights: imagenet }}\n");
    assert_error(&both, 14, 19, "model.weights", "pretrain");
}

#[test]
fn a_byte_order_mark_is_not_part_of_the_document() {
    let with_bom = format!("\u{feff}{GOOD}");
    assert_eq!(spec::parse(&with_bom).unwrap(), spec::parse(GOOD).unwrap());
    // The first key right after the mark (it was read as a key "\u{feff}name" before).
    let first = "\u{feff}dataset: { kind: synthetic }\nname: t\ngrid:\n  backbone: [resnet18]\n  lr_decay: [{ strategy: linear }]\n  epoch_split: [[1, 1]]\n";
    assert!(spec::parse(first).is_ok(), "{:?}", spec::parse(first).err());
}

#[test]
fn a_key_given_twice_is_reported_where_it_is_given_the_second_time() {
    assert_error(&format!("{GOOD}name: other\n"), 10, 1, "name", "`name` is given twice");
    let nested = GOOD.replace("  classes: 4\n", "  classes: 4\n  classes: 5\n");
    assert_error(&nested, 5, 3, "dataset.classes", "`classes` is given twice");
    let flow =
        GOOD.replace("dataset:\n  kind: synthetic\n  classes: 4\n", "dataset: { kind: synthetic, kind: synthetic }\n");
    let e = error(&flow);
    assert_eq!((e.line, e.field.as_str()), (2, "dataset.kind"), "{e}");
    assert!(e.column > 20, "the second `kind`, not the mapping: {e}");
    let grid = GOOD.replace("  backbone: [resnet18, resnet50]\n", "  backbone: [resnet18]\n  backbone: [resnet50]\n");
    assert_error(&grid, 7, 3, "grid.backbone", "given twice");
    // The same key in two different mappings is fine.
    assert!(spec::parse(&GOOD.replace("[[2, 1], [1, 2]]", "[[2, 1]]")).is_ok());
    // Keys that are aliases or collections are not mistaken for their values.
    for odd in ["x: &a 1\n*a : 2\n*a : 2\n", "x: { [a]: 1, [b]: 1 }\n"] {
        let e = error(&format!("{GOOD}{odd}"));
        assert!(!e.message.contains("given twice") || e.message.contains("`?`"), "{e}");
        assert!(!e.message.contains("`1` is given twice") && !e.message.contains("`2` is given twice"), "{e}");
    }
}

#[test]
fn names_are_bounded_and_printable() {
    let long = GOOD.replace("name: t", &format!("name: {}", "n".repeat(201)));
    assert_error(&long, 1, 7, "name", "201 characters long; at most 200");
    assert!(spec::parse(&GOOD.replace("name: t", &format!("name: {}", "n".repeat(200)))).is_ok());
    let escape = GOOD.replace("name: t", "name: \"red\\e[31m\"");
    assert_error(&escape, 1, 7, "name", "control characters");
    assert!(spec::parse(&GOOD.replace("name: t", "name: Blüten 花")).is_ok());
    // A spec an older coordinator accepted and stored still reads (a worker running it).
    assert!(spec::parse_with(&long, ParseOptions::stored()).is_ok());
    assert!(spec::parse_with(&escape, ParseOptions::stored()).is_ok());
}

#[test]
fn a_synthetic_dataset_too_large_for_any_worker_is_refused_with_its_size() {
    // 100,000 classes × 1,000,016 images of 32 px: about 286 TiB.
    let huge = GOOD.replace("  classes: 4\n", "  classes: 100000\n  train_per_class: 1000000\n");
    let e = error(&huge);
    assert_eq!((e.line, e.field.as_str()), (2, "dataset"), "{e}");
    assert!(e.message.contains("GiB of every worker's memory; at most 64 GiB"), "{e}");
    assert!(e.message.contains("286106.9 GiB"), "{e}");
    // The default pretraining set is checked the same way.
    let big = GOOD.replace("  classes: 4\n", "  classes: 4\n  image_size: 4096\n  train_per_class: 1000000\n");
    assert!(error(&big).message.contains("at most 64 GiB"));
    assert!(spec::parse(&GOOD.replace("  classes: 4\n", "  classes: 100\n  train_per_class: 1000\n")).is_ok());
    assert!(spec::parse_with(&huge, ParseOptions::stored()).is_ok(), "the worker checks its own memory");
}

#[test]
fn early_stopping_section() {
    use sweep_core::early_stop::{EarlyStopping, Metric, Strategy};
    assert_eq!(spec::parse(GOOD).unwrap().early_stopping, None, "off unless asked for");
    let asha = format!("{GOOD}early_stopping: {{ strategy: asha }}\n");
    assert_eq!(
        spec::parse(&asha).unwrap().early_stopping,
        Some(EarlyStopping { strategy: Strategy::Asha { eta: 3 }, metric: Metric::ValAccuracy, min_epochs: 1 })
    );
    let median = format!("{GOOD}early_stopping: {{ strategy: median, metric: val_loss, min_trials: 4 }}\n");
    assert_eq!(
        spec::parse(&median).unwrap().early_stopping,
        Some(EarlyStopping { strategy: Strategy::Median { min_trials: 4 }, metric: Metric::ValLoss, min_epochs: 1 })
    );
    let bad = |section: &str| format!("{GOOD}early_stopping: {section}\n");
    assert_error(&bad("{ strategy: hyperband }"), 10, 29, "early_stopping.strategy", "valid: asha, median");
    assert_error(&bad("{ strategy: asha, eta: 1 }"), 10, 40, "early_stopping.eta", "at least 2");
    assert_error(&bad("{ strategy: asha, min_trials: 2 }"), 10, 47, "early_stopping.min_trials", "belongs to");
    assert_error(&bad("{ strategy: median, eta: 3 }"), 10, 42, "early_stopping.eta", "belongs to");
    assert_error(&bad("{ strategy: asha, metric: f1 }"), 10, 43, "early_stopping.metric", "val_accuracy, val_loss");
    // GOOD's longest fine-tuning phase is 2 epochs: a decision at 2 or later never comes.
    assert_error(&bad("{ strategy: asha, min_epochs: 2 }"), 10, 47, "early_stopping.min_epochs", "nothing would");
    assert_error(&bad("{ strategy: asha, grace: 2 }"), 10, 35, "early_stopping", "grace");
}

#[test]
fn sharing_is_on_unless_turned_off() {
    assert!(spec::parse(GOOD).unwrap().sharing, "on by default");
    for (value, on) in [("on", true), ("off", false), ("true", true), ("false", false)] {
        assert_eq!(spec::parse(&format!("{GOOD}sharing: {value}\n")).unwrap().sharing, on, "{value}");
    }
    assert_error(&format!("{GOOD}sharing: sometimes\n"), 10, 10, "sharing", "must be `on` or `off`, got `sometimes`");
    assert_error(&format!("{GOOD}sharing: [on]\n"), 10, 1, "sharing", "must be `on` or `off`, got a list");
    assert_error(&format!("{GOOD}sharing: 3\n"), 10, 10, "sharing", "got `3`");
}

#[test]
fn extending_a_grid_appends_values_keeps_every_old_cell_and_refuses_what_is_there() {
    let add = |backbones: &[&str], lr: &[&str], splits: &[(u32, u32)]| spec::GridAdditions {
        backbones: backbones.iter().map(|s| s.to_string()).collect(),
        lr_decays: lr.iter().map(|s| s.to_string()).collect(),
        epoch_splits: splits.to_vec(),
    };
    let old = spec::parse(GOOD).unwrap();
    let (text, new) = spec::extend_grid(
        GOOD,
        &add(&["vgg16_bn"], &["{ strategy: exponential, head_lr: 1.0e-3, factor: 2 }"], &[(3, 3)]),
        ParseOptions::default(),
    )
    .unwrap();
    assert_eq!(new.grid.backbone, [Backbone::Resnet18, Backbone::Resnet50, Backbone::Vgg16Bn]);
    assert_eq!(new.grid.lr_decay[..1], old.grid.lr_decay[..], "old values first, bit for bit");
    assert_eq!(new.grid.lr_decay[1], LrDecay::Exponential { head_lr: 1.0e-3, factor: 2.0 });
    assert_eq!(new.grid.epoch_split, [(2, 1), (1, 2), (3, 3)]);
    assert_eq!((new.name.as_str(), new.dataset.clone()), (old.name.as_str(), old.dataset.clone()));
    assert_eq!(spec::parse(&text).unwrap(), new, "the text is the spec");
    // Every old cell is a cell of the new grid.
    let cells = |s: &spec::SweepSpec| -> Vec<_> {
        sweep_core::grid::expand(&s.grid)
            .into_iter()
            .map(|t| (t.backbone, t.lr_decay, t.fe_epochs, t.ft_epochs))
            .collect()
    };
    let wide = cells(&new);
    assert_eq!(wide.len(), 3 * 2 * 3);
    assert!(cells(&old).iter().all(|c| wide.contains(c)));

    let refused = |a: spec::GridAdditions, fragment: &str| {
        let e = spec::extend_grid(GOOD, &a, ParseOptions::default()).unwrap_err();
        assert!(e.contains(fragment), "`{e}` lacks `{fragment}`");
    };
    refused(add(&[], &[], &[]), "nothing to add");
    refused(add(&["resnet50"], &[], &[]), "grid.backbone[2]: backbone `resnet50` is listed twice");
    refused(add(&[], &[], &[(1, 2)]), "[1, 2]");
    refused(add(&[], &["{ strategy: linear, head_lr: 1.0e-3, final_lr: 1.0e-6 }"], &[]), "grid.lr_decay[1]");
    refused(add(&[], &["[1, 2"], &[]), "is not YAML");
    refused(add(&[], &["linear"], &[]), "must be a mapping");
    refused(add(&["resnet9000"], &[], &[]), "the extended grid is not valid");
    refused(add(&[], &[], &[(0, 0)]), "the extended grid is not valid");
}

#[test]
fn the_resolved_spec_writes_every_default_and_parses_back_to_the_same_spec() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps");
    let mut texts = vec![
        GOOD.to_string(),
        std::fs::read_to_string(format!("{root}/flowers102.yaml")).unwrap(),
        std::fs::read_to_string(format!("{root}/quickstart.yaml")).unwrap(),
        format!(
            "{GOOD}training: {{ batch_size: 16, seed: 4 }}\npretrain:\n  dataset: {{ kind: synthetic, classes: 20, seed: 9 }}\n  epochs: 3\nsharing: off\n"
        ),
        format!("{GOOD}early_stopping: {{ strategy: median }}\n"),
        format!(
            "{GOOD}early_stopping: {{ strategy: asha, eta: 2, metric: val_loss }}\nmodel: {{ weights: w/a.safetensors }}\n"
        ),
        GOOD.replace("kind: synthetic\n  classes: 4", "kind: image_folder\n  root: /data/x\n  skip_corrupt: true"),
        format!("{GOOD}training: {{ freeze_bn_stats: true, feature_extraction: {{ augment: false }} }}\n"),
    ];
    texts.push(GOOD.replace(
        "final_lr: 1.0e-6",
        "final_lr: 1.0e-6 }\n    - { strategy: exponential, head_lr: 3.0e-4, factor: 2.5",
    ));
    for text in &texts {
        let spec = spec::parse(text).unwrap();
        let resolved = spec::resolved_yaml(&spec);
        assert_eq!(spec::parse(&resolved).unwrap(), spec, "{resolved}");
        // What the text left out is written.
        for key in ["training:", "batch_size:", "augment:", "rotation_deg:", "retries:", "max_attempts:", "sharing:"] {
            assert!(resolved.contains(key), "{key} missing from\n{resolved}");
        }
    }
    // A missing `final_lr` is shown with the default it got.
    let text = GOOD.replace(", final_lr: 1.0e-6", "");
    let resolved = spec::resolved_yaml(&spec::parse(&text).unwrap());
    assert!(resolved.contains("final_lr:"), "{resolved}");
    let median = spec::resolved_yaml(&spec::parse(&format!("{GOOD}early_stopping: {{ strategy: median }}\n")).unwrap());
    assert!(median.contains("min_trials: 3") && median.contains("min_epochs: 1"), "{median}");
}

#[test]
fn feature_extraction_can_leave_out_augmentation() {
    use sweep_core::leaderboard::Phase;
    let s =
        spec::parse(&format!("{GOOD}training: {{ feature_extraction: {{ lr: 0.01, augment: false }} }}\n")).unwrap();
    assert!(!s.training.feature_extraction_augment);
    assert_eq!(s.training.feature_extraction_lr, 0.01);
    assert_eq!(s.training.augment_in(Phase::FeatureExtraction), spec::Augment::NONE);
    assert_eq!(s.training.augment_in(Phase::FineTuning), spec::Augment::default());
    assert!(spec::resolved_yaml(&s).contains("augment: false"), "{}", spec::resolved_yaml(&s));
    let d = spec::parse(GOOD).unwrap();
    assert_eq!(d.training.augment_in(Phase::FeatureExtraction), spec::Augment::default());
    assert!(spec::Augment::NONE.is_identity() && !spec::Augment::default().is_identity());
    assert!(!spec::Augment { color_jitter: 0.1, ..spec::Augment::NONE }.is_identity());
}
