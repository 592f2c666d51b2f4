//! Fuzzing the spec parser with proptest: arbitrary text and bytes, YAML-shaped documents built
//! from the spec's own keys with random values and types, and mutations of the shipped specs
//! (`sweeps/*.yaml`).
//!
//! Properties, for every input: `spec::parse` returns (no panic, no hang); an error has a
//! non-empty message, a field path or none, and a 1-based line:column inside the document; a
//! spec that parses expands to the same grid every time, within the trial limit, and parsing the
//! same text twice gives the same result.
//!
//! The runs are seeded (`PROPTEST_RNG_SEED` picks another seed, `PROPTEST_CASES` more cases).

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use sweep_core::backbone;
use sweep_core::grid;
use sweep_core::spec::{self, DEFAULT_MAX_TRIALS, ParseOptions, SpecError, SweepSpec};

const QUICKSTART: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/quickstart.yaml"));
const FLOWERS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../sweeps/flowers102.yaml"));

fn config(cases: u32) -> Config {
    let mut c = Config { failure_persistence: None, ..Config::default() };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(0x5eed_5eed);
    }
    c
}

// ---------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------

/// Parses `text` with a trial limit of `max_trials` and checks every property.
fn check(text: &str, max_trials: usize) -> Result<(), TestCaseError> {
    let options = ParseOptions::with_max_trials(max_trials);
    let first = spec::parse_with(text, options);
    match &first {
        Err(e) => check_error(text, e)?,
        Ok(s) => check_spec(s, max_trials)?,
    }
    prop_assert_eq!(&first, &spec::parse_with(text, options), "parsing is not deterministic");
    Ok(())
}

fn check_error(text: &str, e: &SpecError) -> Result<(), TestCaseError> {
    prop_assert!(!e.message.trim().is_empty(), "empty message: {:?}", e);
    prop_assert!(
        e.field.chars().all(|c| c.is_ascii_alphanumeric() || "_.[]-?".contains(c)),
        "field is not a path: {:?}",
        e
    );
    // Lines and columns are 1-based and inside the document (an error at its very end may sit
    // one past the last line or character). Lines end where YAML says they do: at `\n`, `\r`
    // or `\r\n`, and for serde_yaml's YAML 1.1 scanner also at U+0085, U+2028 and U+2029.
    prop_assert!(e.line >= 1 && e.column >= 1, "position not 1-based: {:?}", e);
    let inside =
        |lines: &[usize]| e.line <= lines.len() + 1 && e.column <= lines.get(e.line - 1).copied().unwrap_or(0) + 1;
    let (yaml_1_2, yaml_1_1) = (line_widths(text, false), line_widths(text, true));
    prop_assert!(
        inside(&yaml_1_2) || inside(&yaml_1_1),
        "line {}, column {} is outside the document (line widths {:?}): {:?}",
        e.line,
        e.column,
        yaml_1_2,
        e
    );
    let shown = e.to_string();
    let at = format!("line {}, column {}: ", e.line, e.column);
    prop_assert!(shown.starts_with(&at), "`{}` does not start with `{}`", shown, at);
    Ok(())
}

/// The width in characters of each line of `text`.
fn line_widths(text: &str, yaml_1_1: bool) -> Vec<usize> {
    let mut widths = vec![0];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let brk = match c {
            '\n' => true,
            '\r' => {
                chars.next_if_eq(&'\n');
                true
            }
            '\u{85}' | '\u{2028}' | '\u{2029}' => yaml_1_1,
            _ => false,
        };
        if brk {
            widths.push(0);
        } else if let Some(w) = widths.last_mut() {
            *w += 1;
        }
    }
    widths
}

fn check_spec(s: &SweepSpec, max_trials: usize) -> Result<(), TestCaseError> {
    let trials = grid::expand(&s.grid);
    prop_assert_eq!(&trials, &grid::expand(&s.grid), "expansion is not deterministic");
    prop_assert_eq!(trials.len(), s.grid.trial_count());
    prop_assert!(!trials.is_empty() && trials.len() <= max_trials, "{} trials, limit {}", trials.len(), max_trials);
    let (nl, ne) = (s.grid.lr_decay.len(), s.grid.epoch_split.len());
    for (i, t) in trials.iter().enumerate() {
        prop_assert_eq!(t.index, i);
        prop_assert_eq!(&t.id, &grid::trial_id(i));
        prop_assert_eq!(grid::trial_index(&t.id), Some(i));
        // Backbone slowest, epoch split fastest.
        prop_assert_eq!(t.backbone, s.grid.backbone[i / (nl * ne)]);
        prop_assert_eq!(t.lr_decay, s.grid.lr_decay[(i / ne) % nl]);
        prop_assert_eq!((t.fe_epochs, t.ft_epochs), s.grid.epoch_split[i % ne]);
        prop_assert!(t.fe_epochs >= 1 && t.ft_epochs >= 1);
    }
    prop_assert!(!s.name.trim().is_empty());
    prop_assert!(s.resources.gpus_per_trial >= 1 && s.retries.max_attempts >= 1);
    prop_assert!(s.training.batch_size >= 1 && s.dataset.image_size() >= 1);
    prop_assert!(s.training.feature_extraction_lr.is_finite() && s.training.feature_extraction_lr > 0.0);
    Ok(())
}

/// Trial limits: mostly the default, sometimes small enough to be hit.
fn max_trials() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(DEFAULT_MAX_TRIALS), 1 => 1usize..20]
}

// ---------------------------------------------------------------------------------------------
// Arbitrary text
// ---------------------------------------------------------------------------------------------

/// Characters that make YAML structure, and a few that break it.
const YAML_CHARS: &[char] = &[
    ':', '-', ' ', ' ', ' ', '\n', '\n', '\t', '[', ']', '{', '}', ',', '&', '*', '!', '|', '>', '\'', '"', '#', '%',
    '@', '`', '?', '~', '.', '0', '1', '9', 'e', 'a', 'n', 'x', '\\', '\r', '\u{0}', '\u{feff}', '\u{85}', '\u{2028}',
    'é', '😀',
];

fn yaml_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(YAML_CHARS), 0..120).prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(config(384))]

    #[test]
    fn arbitrary_strings(text in any::<String>(), max in max_trials()) {
        check(&text, max)?;
    }

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400), max in max_trials()) {
        check(&String::from_utf8_lossy(&bytes), max)?;
    }

    #[test]
    fn yaml_punctuation_soup(text in yaml_soup(), max in max_trials()) {
        check(&text, max)?;
    }

    /// Soup after a valid prefix, so the garbage lands inside a document.
    #[test]
    fn soup_after_a_valid_prefix(cut in any::<prop::sample::Index>(), soup in yaml_soup(), max in max_trials()) {
        let at = floor_char_boundary(QUICKSTART, cut.index(QUICKSTART.len() + 1));
        check(&format!("{}{soup}", &QUICKSTART[..at]), max)?;
    }
}

// ---------------------------------------------------------------------------------------------
// YAML-shaped documents from the spec's keys
// ---------------------------------------------------------------------------------------------

/// A YAML node; collections are written in block or flow style.
#[derive(Debug, Clone)]
enum Node {
    Scalar(String),
    Map(Vec<(String, Node)>, bool),
    Seq(Vec<Node>, bool),
}

impl Node {
    fn render(&self) -> String {
        let mut out = String::new();
        match self {
            Node::Scalar(s) => out.push_str(s),
            Node::Map(..) | Node::Seq(..) if self.is_flow() => out.push_str(&self.flow()),
            _ => self.block(0, &mut out),
        }
        out.push('\n');
        out
    }

    fn is_flow(&self) -> bool {
        matches!(self, Node::Map(_, true) | Node::Seq(_, true))
            || matches!(self, Node::Map(m, _) if m.is_empty())
            || matches!(self, Node::Seq(s, _) if s.is_empty())
    }

    fn flow(&self) -> String {
        match self {
            Node::Scalar(s) => s.clone(),
            Node::Map(m, _) => {
                let items: Vec<String> = m.iter().map(|(k, v)| format!("{k}: {}", v.flow())).collect();
                format!("{{{}}}", items.join(", "))
            }
            Node::Seq(s, _) => format!("[{}]", s.iter().map(Node::flow).collect::<Vec<_>>().join(", ")),
        }
    }

    /// Writes a block collection whose lines start at `indent`.
    fn block(&self, indent: usize, out: &mut String) {
        let pad = " ".repeat(indent);
        match self {
            Node::Map(m, _) => {
                for (k, v) in m {
                    out.push_str(&format!("{pad}{k}:"));
                    v.after_indicator(indent, out);
                }
            }
            Node::Seq(s, _) => {
                for v in s {
                    out.push_str(&format!("{pad}-"));
                    v.after_indicator(indent, out);
                }
            }
            Node::Scalar(s) => out.push_str(&format!("{pad}{s}\n")),
        }
    }

    /// Writes a value after `key:` or `-`.
    fn after_indicator(&self, indent: usize, out: &mut String) {
        match self {
            Node::Scalar(s) => out.push_str(&format!(" {s}\n")),
            _ if self.is_flow() => out.push_str(&format!(" {}\n", self.flow())),
            _ => {
                out.push('\n');
                self.block(indent + 2, out);
            }
        }
    }
}

fn scalar(choices: &'static [&'static str]) -> BoxedStrategy<Node> {
    prop::sample::select(choices).prop_map(|s| Node::Scalar(s.to_string())).boxed()
}

/// How far generated values stray from valid ones: a `Wild` document has wrong types, near
/// misses and out-of-range numbers everywhere; a `Tame` one mostly valid values, so that it gets
/// past the types into validation, and sometimes all the way through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    Tame,
    Wild,
}

/// `(valid, invalid)` weights for a choice between a valid value and a bad one.
fn odds(c: Chaos) -> (u32, u32) {
    match c {
        Chaos::Tame => (40, 1),
        Chaos::Wild => (3, 2),
    }
}

fn int(c: Chaos) -> BoxedStrategy<Node> {
    let (good, bad) = odds(c);
    prop_oneof![
        good => prop_oneof![(1i64..8), (1i64..300)].prop_map(|v| Node::Scalar(v.to_string())),
        bad => prop_oneof![
            (-3i64..1).prop_map(|v| Node::Scalar(v.to_string())),
            scalar(&[
                "4096", "4097", "65536", "65537", "100000", "100001", "1024", "1025", "1000", "1001",
                "9223372036854775807", "-9223372036854775808", "99999999999999999999", "1.5", "2.0", "0x10", "0o7",
                "+3", "1_000", "1e3", ".inf", ".nan", "~", "null", "\"3\"", "'4'", "true", "three", "[]", "{}",
            ]),
            any::<i64>().prop_map(|v| Node::Scalar(v.to_string())),
        ],
    ]
    .boxed()
}

fn float(c: Chaos) -> BoxedStrategy<Node> {
    let (good, bad) = odds(c);
    prop_oneof![
        good => prop_oneof![
            scalar(&["1.0e-3", "1.0e-4", "1e-8", "0.3", "0.5", "1", "3", "0.01", "1.0", "1.5"]),
            (0.001f64..1.0).prop_map(|v| Node::Scalar(v.to_string())),
        ],
        bad => prop_oneof![
            scalar(&[
                "0", "0.0", "-0.0", "-1", "15", "60", "61", "180", "181", ".nan", ".NaN", ".inf", "-.inf", "+.inf",
                "1e400", "-1e400", "1e-400", "4.9e-324", "1.7976931348623157e308", "~", "\"0.1\"", "abc", "[]",
                "1e", "0x1p3",
            ]),
            any::<f64>().prop_map(|v| Node::Scalar(format!("{v:e}"))),
            int(Chaos::Wild),
        ],
    ]
    .boxed()
}

fn boolean(c: Chaos) -> BoxedStrategy<Node> {
    let (good, bad) = odds(c);
    prop_oneof![
        good => scalar(&["true", "false"]),
        bad => scalar(&["True", "FALSE", "yes", "no", "on", "1", "0", "~", "\"true\""]),
    ]
    .boxed()
}

fn text(c: Chaos) -> BoxedStrategy<Node> {
    let (good, bad) = odds(c);
    prop_oneof![
        good => prop_oneof![
            scalar(&["t", "quickstart", "my sweep", "/data/x", "/d", "\"a: b\"", "'it''s'", "é😀", "\"\\t\""]),
            "[a-z][a-z_ ]{0,11}".prop_map(Node::Scalar),
        ],
        bad => scalar(&[
            "\"\"", "''", "\" \"", "~", "null", "3", "true", "\"\\u0000\"", "!!str 5", "!!int 5", "!!binary aGk=",
            "[]", "{a: 1}",
        ]),
    ]
    .boxed()
}

/// A name from `valid`, or a near miss.
fn word(valid: &'static [&'static str], c: Chaos) -> BoxedStrategy<Node> {
    let (good, bad) = odds(c);
    prop_oneof![
        good => scalar(valid),
        bad => prop_oneof![
            scalar(&["", "\"\"", "resnet", "Linear", "cosine", "cuda", "~", "[]", "{}", "RESNET18", "other"]),
            (prop::sample::select(valid), "[a-z0-9_]{1,3}").prop_map(|(v, s)| Node::Scalar(format!("{v}{s}"))),
        ],
    ]
    .boxed()
}

/// A list of `min..max` items, in flow or block style.
fn list(item: BoxedStrategy<Node>, min: usize, max: usize) -> BoxedStrategy<Node> {
    (prop::collection::vec(item, min..max), any::<bool>()).prop_map(|(v, flow)| Node::Seq(v, flow)).boxed()
}

/// Any node, for values of the wrong type.
fn wild() -> BoxedStrategy<Node> {
    let w = Chaos::Wild;
    let leaf = prop_oneof![int(w), float(w), boolean(w), text(w), word(&["resnet18", "linear", "synthetic"], w)];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            list(inner.clone(), 0, 4),
            (prop::collection::vec((key(), inner), 0..4), any::<bool>()).prop_map(|(m, flow)| Node::Map(m, flow)),
        ]
    })
    .boxed()
}

/// Every key the spec knows, and some it does not.
fn key() -> BoxedStrategy<String> {
    prop::sample::select(
        &[
            "name",
            "dataset",
            "kind",
            "root",
            "image_size",
            "classes",
            "train_per_class",
            "val_per_class",
            "seed",
            "train_split",
            "val_split",
            "skip_corrupt",
            "model",
            "weights",
            "training",
            "batch_size",
            "optimizer",
            "weight_decay",
            "feature_extraction",
            "lr",
            "fine_tuning",
            "default_lr",
            "freeze_bn_stats",
            "augment",
            "hflip",
            "rotation_deg",
            "shear_deg",
            "color_jitter",
            "grid",
            "backbone",
            "lr_decay",
            "strategy",
            "head_lr",
            "final_lr",
            "factor",
            "epoch_split",
            "resources",
            "gpus_per_trial",
            "retries",
            "max_attempts",
            "pretrain",
            "epochs",
            "colour",
            "Name",
            "\"name\"",
            "? name",
            "<<",
            "",
        ][..],
    )
    .prop_map(str::to_string)
    .boxed()
}

/// A mapping of the given fields: each (key, presence weight out of 10, value) is present or
/// not; with chaos, a value is sometimes of a wrong type, a key duplicated or an unknown one
/// added.
fn fields(entries: Vec<(&'static str, u32, BoxedStrategy<Node>)>, c: Chaos) -> BoxedStrategy<Node> {
    let (good, bad) = odds(c);
    let parts: Vec<BoxedStrategy<Option<(String, Node)>>> = entries
        .into_iter()
        .map(|(k, weight, value)| {
            let value = prop_oneof![good => value, bad => wild()];
            prop_oneof![
                weight => value.prop_map(move |v| Some((k.to_string(), v))),
                10 - weight => Just(None),
            ]
            .boxed()
        })
        .collect();
    let rare = if c == Chaos::Wild { 0.1 } else { 0.01 };
    (
        parts,
        prop::option::weighted(rare, (key(), wild())),
        prop::option::weighted(rare, any::<prop::sample::Index>()),
        any::<bool>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(parts, extra, dup, flow, at)| {
            let mut m: Vec<(String, Node)> = parts.into_iter().flatten().collect();
            if let Some(extra) = extra {
                m.insert(at.index(m.len() + 1), extra);
            }
            if let (Some(dup), false) = (dup, m.is_empty()) {
                let e = m[dup.index(m.len())].clone();
                m.push(e);
            }
            Node::Map(m, flow)
        })
        .boxed()
}

/// A dataset mapping: with chaos, any key with any kind; tame, the keys of its kind.
fn dataset(c: Chaos) -> BoxedStrategy<Node> {
    let size = || prop_oneof![9 => scalar(&["32", "64", "224"]), 1 => int(c)].boxed();
    let split = || list(word(&["train", "val", "test"], c), 1, 3);
    let kind = |k: &'static [&'static str]| word(k, c);
    match c {
        Chaos::Wild => fields(
            vec![
                ("kind", 10, kind(&["synthetic", "image_folder", "flowers102"])),
                ("root", 3, text(c)),
                ("image_size", 5, size()),
                ("classes", 3, int(c)),
                ("train_per_class", 3, int(c)),
                ("val_per_class", 3, int(c)),
                ("seed", 3, int(c)),
                ("train_split", 2, split()),
                ("val_split", 2, split()),
                ("skip_corrupt", 2, boolean(c)),
            ],
            c,
        ),
        Chaos::Tame => prop_oneof![
            3 => fields(
                vec![
                    ("kind", 10, kind(&["synthetic"])),
                    ("image_size", 5, size()),
                    ("classes", 5, int(c)),
                    ("train_per_class", 3, int(c)),
                    ("val_per_class", 3, int(c)),
                    ("seed", 3, int(c)),
                ],
                c,
            ),
            1 => fields(
                vec![
                    ("kind", 10, kind(&["image_folder"])),
                    ("root", 10, text(c)),
                    ("image_size", 5, size()),
                    ("skip_corrupt", 3, boolean(c)),
                ],
                c,
            ),
            1 => fields(
                vec![
                    ("kind", 10, kind(&["flowers102"])),
                    ("root", 10, text(c)),
                    ("train_split", 5, split()),
                    ("val_split", 5, split()),
                    ("image_size", 5, size()),
                    ("skip_corrupt", 3, boolean(c)),
                ],
                c,
            ),
        ]
        .boxed(),
    }
}

fn lr_decay(c: Chaos) -> BoxedStrategy<Node> {
    let strategy = |s: &'static [&'static str]| word(s, c);
    let (head_lr, final_lr, factor) =
        (float(c), float(c), prop_oneof![scalar(&["1", "2", "3", "10", "1.5"]), float(Chaos::Wild)].boxed());
    match c {
        Chaos::Wild => fields(
            vec![
                ("strategy", 10, strategy(&["linear", "exponential"])),
                ("head_lr", 6, head_lr),
                ("final_lr", 4, final_lr),
                ("factor", 4, factor),
            ],
            c,
        ),
        Chaos::Tame => prop_oneof![
            fields(
                vec![("strategy", 10, strategy(&["linear"])), ("head_lr", 6, head_lr), ("final_lr", 6, final_lr)],
                c
            ),
            fields(
                vec![("strategy", 10, strategy(&["exponential"])), ("head_lr", 6, float(c)), ("factor", 6, factor)],
                c
            ),
        ]
        .boxed(),
    }
}

fn grid_node(c: Chaos) -> BoxedStrategy<Node> {
    let pair = prop_oneof![
        12 => (int(c), int(c)).prop_map(|(a, b)| Node::Seq(vec![a, b], true)),
        1 => list(int(c), 0, 4),
    ];
    let backbones: &'static [&'static str] = Box::leak(backbone::names().into_boxed_slice());
    fields(
        vec![
            ("backbone", 10, list(word(backbones, c), 1, 4)),
            ("lr_decay", 10, list(lr_decay(c), 1, 3)),
            ("epoch_split", 10, list(pair.boxed(), 1, 4)),
        ],
        c,
    )
}

fn training(c: Chaos) -> BoxedStrategy<Node> {
    let deg = || prop_oneof![scalar(&["0", "5", "10", "15"]), float(c)].boxed();
    fields(
        vec![
            ("batch_size", 5, int(c)),
            ("optimizer", 3, word(&["adam"], c)),
            ("weight_decay", 3, prop_oneof![scalar(&["0", "0.0", "1.0e-4"]), float(c)].boxed()),
            ("seed", 3, int(c)),
            ("feature_extraction", 4, fields(vec![("lr", 8, float(c))], c)),
            ("fine_tuning", 4, fields(vec![("default_lr", 8, float(c))], c)),
            ("freeze_bn_stats", 2, boolean(c)),
            (
                "augment",
                4,
                fields(
                    vec![
                        ("hflip", 5, boolean(c)),
                        ("rotation_deg", 5, deg()),
                        ("shear_deg", 5, deg()),
                        ("color_jitter", 5, float(c)),
                    ],
                    c,
                ),
            ),
        ],
        c,
    )
}

fn document(c: Chaos) -> BoxedStrategy<Node> {
    let pretrain_weight = if c == Chaos::Tame { 2 } else { 3 };
    fields(
        vec![
            ("name", 10, text(c)),
            ("dataset", 10, dataset(c)),
            ("model", 3, fields(vec![("weights", 7, word(&["none", "imagenet", "w.safetensors"], c))], c)),
            ("training", 5, training(c)),
            ("grid", 10, grid_node(c)),
            ("resources", 4, fields(vec![("gpus_per_trial", 8, int(c))], c)),
            ("retries", 4, fields(vec![("max_attempts", 8, int(c))], c)),
            (
                "pretrain",
                pretrain_weight,
                fields(
                    vec![
                        ("dataset", 9, dataset(c)),
                        ("epochs", 9, int(c)),
                        ("lr", 4, float(c)),
                        ("batch_size", 3, int(c)),
                        ("seed", 3, int(c)),
                    ],
                    c,
                ),
            ),
        ],
        c,
    )
}

/// Something before the document: nothing mostly, or a marker, a comment, a directive.
fn preamble() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        8 => Just(""),
        1 => prop::sample::select(&["---\n", "# a comment\n", "%YAML 1.2\n---\n", "--- !!map\n", "\u{feff}"][..]),
    ]
}

fn chaos() -> impl Strategy<Value = Chaos> {
    prop_oneof![Just(Chaos::Tame), Just(Chaos::Wild)]
}

proptest! {
    #![proptest_config(config(768))]

    #[test]
    fn documents_built_from_the_spec_keys(
        doc in chaos().prop_flat_map(document),
        pre in preamble(),
        max in max_trials(),
    ) {
        check(&format!("{pre}{}", doc.render()), max)?;
    }

    #[test]
    fn wild_documents(doc in wild(), max in max_trials()) {
        check(&doc.render(), max)?;
    }
}

/// The generator reaches deep into validation: tame documents often parse, and the errors of
/// the rest come from every section.
#[test]
fn generated_documents_reach_every_section() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::new(config(1));
    let mut count = |c: Chaos| {
        let strategy = document(c);
        let (mut ok, mut errors) = (0, std::collections::BTreeMap::<String, usize>::new());
        for _ in 0..300 {
            let text = strategy.new_tree(&mut runner).unwrap().current().render();
            match spec::parse(&text) {
                Ok(_) => ok += 1,
                Err(e) => *errors.entry(e.field.split(['.', '[']).next().unwrap_or("").to_string()).or_default() += 1,
            }
        }
        (ok, errors)
    };
    let (ok, errors) = count(Chaos::Tame);
    assert!(ok >= 30, "only {ok} of 300 tame documents parse; errors by section: {errors:?}");
    let (_, wild) = count(Chaos::Wild);
    for section in ["name", "dataset", "training", "grid"] {
        assert!(errors.contains_key(section) || wild.contains_key(section), "{section}: {errors:?} {wild:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations of the shipped specs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    Delete(prop::sample::Index),
    Duplicate(prop::sample::Index),
    Swap(prop::sample::Index, prop::sample::Index),
    /// Replaces one token (a run of characters other than space and `:,[]{}#`) of a line.
    Token(prop::sample::Index, prop::sample::Index, String),
    Indent(prop::sample::Index, i8),
    Truncate(prop::sample::Index),
    InsertChar(prop::sample::Index, char),
    DeleteChar(prop::sample::Index),
}

fn replacement() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&[
            "0", "-1", "1", "2", "100001", "1e400", ".nan", "-.inf", "~", "\"\"", "[]", "{}", "[1]", "[1, 2, 3]",
            "true", "resnet19", "resnet18", "cosine", "linear", "exponential", "image_folder", "flowers102",
            "synthetic", "test", "train", "val", "imagenet", "x.safetensors", "&a", "*a", "!!str", "'", "\"", "-",
            ":", "- x", "? x", "|", ">", "#", "9999999999999999999999", "0.0", "65537", "4097", "1.5",
        ][..])
        .prop_map(str::to_string),
        1 => "[ -~]{0,6}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    use prop::sample::Index;
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::Delete),
        2 => any::<Index>().prop_map(Mutation::Duplicate),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        6 => (any::<Index>(), any::<Index>(), replacement()).prop_map(|(l, t, s)| Mutation::Token(l, t, s)),
        2 => (any::<Index>(), prop::sample::select(&[-4i8, -2, -1, 1, 2, 4][..])).prop_map(|(l, d)| Mutation::Indent(l, d)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), prop::sample::select(YAML_CHARS)).prop_map(|(i, c)| Mutation::InsertChar(i, c)),
        2 => any::<Index>().prop_map(Mutation::DeleteChar),
    ]
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in mutations {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match m {
            Mutation::Delete(i) => {
                lines.remove(i.index(n));
            }
            Mutation::Duplicate(i) => {
                let l = lines[i.index(n)].clone();
                lines.insert(i.index(n), l);
            }
            Mutation::Swap(a, b) => lines.swap(a.index(n), b.index(n)),
            Mutation::Token(l, t, s) => {
                let line = &mut lines[l.index(n)];
                let is_token = |c: char| !" :,[]{}#".contains(c);
                let mut spans = Vec::new();
                let mut start = None;
                for (i, c) in line.char_indices().chain(std::iter::once((line.len(), ' '))) {
                    match (start, is_token(c)) {
                        (None, true) => start = Some(i),
                        (Some(s0), false) => {
                            spans.push((s0, i));
                            start = None;
                        }
                        _ => {}
                    }
                }
                if !spans.is_empty() {
                    let (a, b) = spans[t.index(spans.len())];
                    line.replace_range(a..b, s);
                }
            }
            Mutation::Indent(l, d) => {
                let line = &mut lines[l.index(n)];
                if *d > 0 {
                    line.insert_str(0, &" ".repeat(*d as usize));
                } else {
                    let strip = line.len() - line.trim_start_matches(' ').len();
                    line.replace_range(..strip.min(d.unsigned_abs() as usize), "");
                }
            }
            Mutation::Truncate(i) => {
                let joined = lines.join("\n");
                let at = floor_char_boundary(&joined, i.index(joined.len() + 1));
                lines = joined[..at].split('\n').map(str::to_string).collect();
            }
            Mutation::InsertChar(i, c) => {
                let line = &mut lines[i.index(n)];
                let at = floor_char_boundary(line, i.index(line.len() + 1));
                line.insert(at, *c);
            }
            Mutation::DeleteChar(i) => {
                let line = &mut lines[i.index(n)];
                if !line.is_empty() {
                    let at = floor_char_boundary(line, i.index(line.len()));
                    line.remove(at);
                }
            }
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn mutated_shipped_specs(
        flowers in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..5),
        max in max_trials(),
    ) {
        let text = mutate(if flowers { FLOWERS } else { QUICKSTART }, &mutations);
        check(&text, max)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed adversarial inputs (and regressions the fuzzer found)
// ---------------------------------------------------------------------------------------------

#[test]
fn the_unmutated_shipped_specs_pass_the_properties() {
    for text in [QUICKSTART, FLOWERS] {
        assert!(spec::parse(text).is_ok());
        check(text, DEFAULT_MAX_TRIALS).unwrap();
        check(text, 1).unwrap();
        assert!(spec::parse_with(text, ParseOptions::with_max_trials(1)).is_err());
    }
}

#[test]
fn adversarial_documents_end_in_errors_not_panics_or_hangs() {
    let deep_seq = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let deep_map = format!("{}1{}", "{a: ".repeat(20_000), "}".repeat(20_000));
    let deep_block: String = (0..3_000).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
    let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = if i == 1 { "a".to_string() } else { format!("a{}", i - 1) };
        laughs.push_str(&format!("a{i}: &a{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    let laughs_in_grid = "name: t\ndataset: {kind: synthetic}\ngrid: {backbone: [&b resnet18, *b], lr_decay: &l [{strategy: linear}], epoch_split: *l}\n".to_string();
    let deep_dashes = format!("{}x\n", "- ".repeat(200_000));
    let deep_indented: String = (0..2_000).map(|i| format!("{}-\n", " ".repeat(i))).collect();
    let many_keys: String = (0..20_000).map(|i| format!("k{i}: {i}\n")).collect();
    let long_line = format!("name: {}\n", "x".repeat(1 << 20));
    let many_backbones = format!(
        "name: t\ndataset: {{kind: synthetic}}\ngrid: {{backbone: [{}], lr_decay: [{{strategy: linear}}], epoch_split: [[1, 1]]}}\n",
        vec!["resnet18"; 100_000].join(", ")
    );
    let many_splits = format!(
        "name: t\ndataset: {{kind: synthetic}}\ngrid: {{backbone: [resnet18], lr_decay: [{{strategy: linear}}], epoch_split: [{}]}}\n",
        (1..=20_000).map(|i| format!("[1, {i}]")).collect::<Vec<_>>().join(", ")
    );
    for (name, text) in [
        ("deep flow sequence", deep_seq),
        ("deep flow mapping", deep_map),
        ("deep block mapping", deep_block),
        ("deep block sequence on one line", deep_dashes),
        ("deep block sequence over lines", deep_indented),
        ("billion laughs", laughs),
        ("aliases in the grid", laughs_in_grid),
        ("many keys", many_keys),
        ("a 1 MiB line", long_line),
        ("100000 backbones", many_backbones),
        ("20000 epoch splits", many_splits),
    ] {
        let started = std::time::Instant::now();
        let result = spec::parse(&text);
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{name}: {:?}", started.elapsed());
        let e = result.expect_err(name);
        check(&text, DEFAULT_MAX_TRIALS).unwrap_or_else(|f| panic!("{name}: {f}"));
        if name.starts_with("deep") {
            // Found by this test: a block mapping 3,000 levels deep overflowed the stack (yaml-rust2's
            // `Parser::load` recurses per level; `- - - …` does from about 10,000), and `[[[[…` or
            // `{a: {a: …` took seconds in serde_yaml. All now stop where the nesting passes 64.
            assert_eq!(e.message, "the document is nested more than 64 levels deep", "{name}");
            assert_eq!(
                e.line,
                if name.contains("over lines") || name == "deep block mapping" { 65 } else { 1 },
                "{name}: {e}"
            );
        }
    }
}

/// Nesting up to the limit is structure, not an error of its own: the error is the spec's.
#[test]
fn nesting_just_under_the_limit_is_read() {
    let nested = format!("name: t\nx: {}1{}\n", "[".repeat(62), "]".repeat(62));
    let e = spec::parse(&nested).unwrap_err();
    assert_eq!((e.line, e.column), (2, 1), "{e}");
    assert!(e.message.contains("unknown field `x`"), "{e}");
}
