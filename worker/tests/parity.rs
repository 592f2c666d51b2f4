//! Every backbone equals torchvision's.
//!
//! `tools/parity_reference.py` (run with the project venv's Python: `<repo>/.venv/bin/python`,
//! or `$SWEEP_PYTHON`) builds each torchvision model with random weights and a new head of
//! [`CLASSES`] outputs, makes its BatchNorm layers non-trivial, and writes its `state_dict` plus
//! inputs and fp32 logits. Here the worker's model loads that `state_dict` — every tensor, head
//! included — and must produce the same logits:
//!
//! * names: the worker's parameters and buffers are torchvision's, in the same order;
//! * eval mode: logits at every listed input size (square, odd and non-square);
//! * training mode with dropout and stochastic depth off: logits (batch statistics), and every
//!   buffer afterwards (running statistics updated with momentum 0.1, `num_batches_tracked`).
//!
//! The error measure is `max|a - b| / max|b|` over a whole tensor (relative to the reference's
//! largest magnitude), and must be at most [`TOLERANCE`]; `num_batches_tracked` must be equal.
//! Run with `--nocapture` to see the figures.
//!
//! Both sides compute with one libtorch thread: a reduction split over threads can round
//! differently, and on a shared 2-core machine one thread is several times faster than two
//! (spinning OpenMP teams). With equal thread counts the worker's results are bit-identical to
//! torchvision's, since both use the venv's libtorch.
//!
//! The Python tools are part of the test: when Python or torchvision is missing the tests fail
//! and say to run `make test`, which creates the venv.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sweep_core::Backbone;
use sweep_worker::model::{ForwardMode, Model, ModelError};
use tch::{Device, Kind, Tensor};

/// Outputs of the new head in the reference models.
const CLASSES: i64 = 5;
/// Largest accepted `max|a - b| / max|b|`.
const TOLERANCE: f64 = 1e-4;
/// Seed of the reference models and inputs.
const SEED: u64 = 7;

/// Input sizes (height, width) per backbone; the first one is also used for the training-mode
/// check. 32 px is every backbone's `min_image_size`.
const CASES: [(Backbone, &[(i64, i64)]); 9] = [
    (Backbone::Vgg16Bn, &[(32, 32), (97, 97), (224, 224)]),
    (Backbone::Resnet18, &[(64, 64), (97, 80), (32, 32)]),
    (Backbone::Resnet34, &[(64, 64)]),
    (Backbone::Resnet50, &[(64, 64)]),
    (Backbone::Resnet101, &[(64, 64)]),
    (Backbone::Resnet152, &[(64, 64)]),
    (Backbone::EfficientnetB0, &[(64, 64), (32, 32), (97, 80)]),
    (Backbone::MobilenetV2, &[(64, 64), (32, 32), (97, 80)]),
    (Backbone::Densenet121, &[(64, 64), (32, 32), (97, 97)]),
];

/// Training-mode forward without randomness: BatchNorm uses batch statistics and updates its
/// running statistics, dropout and stochastic depth are identity.
const TRAIN_NO_DROPOUT: ForwardMode = ForwardMode { train: false, bn_train: true };

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("worker/ has a parent").to_path_buf()
}

/// The Python to run the tools with: `explicit` (from `$SWEEP_PYTHON`) or the project venv's,
/// checked to import torch, torchvision and safetensors.
fn find_python(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    const HOW: &str = "run `make test` (it creates the project venv .venv with torch, torchvision and safetensors from requirements.txt), or set SWEEP_PYTHON to a Python that has them";
    let python = explicit.unwrap_or_else(|| repo_root().join(".venv/bin/python"));
    let out = Command::new(&python).args(["-c", "import torch, torchvision, safetensors"]).output().map_err(|e| {
        format!("the parity tests need Python with torchvision: cannot run {}: {e}; {HOW}", python.display())
    })?;
    if !out.status.success() {
        return Err(format!(
            "the parity tests need Python with torchvision: {} cannot import torch, torchvision and safetensors ({}); {HOW}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(python)
}

/// [`find_python`] for `$SWEEP_PYTHON` or the venv, checked once per test process.
fn python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| find_python(std::env::var_os("SWEEP_PYTHON").map(PathBuf::from)))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `tools/<script>` with `args`; panics with its output when it fails.
fn run_tool(script: &str, args: &[String]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tools").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} {args:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    format!("{stdout}{stderr}")
}

/// The `__metadata__` of a safetensors file's header.
fn metadata(path: &Path) -> HashMap<String, String> {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
    f.read_exact(&mut header).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    serde_json::from_value(v["__metadata__"].clone()).unwrap()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

/// `max|a - b| / max|b|` (`max|a - b|` when `b` is all zeros).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]);
    if scale > 0.0 { diff / scale } else { diff }
}

/// Runs `tools/parity_reference.py` for `backbones` (with their [`CASES`] sizes) into a new
/// temporary directory, removed when the returned guard drops.
fn references(backbones: &[Backbone]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("parity-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a directory under the target directory");
    let mut args: Vec<String> = vec![
        "--out".into(),
        dir.path().to_str().unwrap().into(),
        "--seed".into(),
        SEED.to_string(),
        "--classes".into(),
        CLASSES.to_string(),
        "--train".into(),
    ];
    for b in backbones {
        let sizes: Vec<String> = sizes_of(*b).iter().map(|(h, w)| format!("{h}x{w}")).collect();
        args.push(format!("{}:{}", b.name(), sizes.join(",")));
    }
    let log = run_tool("parity_reference.py", &args);
    print!("{log}");
    dir
}

fn sizes_of(backbone: Backbone) -> &'static [(i64, i64)] {
    CASES.iter().find(|(b, _)| *b == backbone).map(|(_, s)| *s).expect("every backbone has a parity case")
}

/// One line of the figures.
#[derive(Debug)]
struct Figure {
    what: String,
    err: f64,
}

/// Checks `backbone` against its reference in `dir`: the figures, or why they could not be
/// computed (names, order or loading). Panics only on a broken reference directory.
fn check(dir: &Path, backbone: Backbone) -> Result<Vec<Figure>, String> {
    let name = backbone.name();
    let sizes = sizes_of(backbone);
    let weights = dir.join(format!("{name}.safetensors"));
    let logits_file = dir.join(format!("{name}.logits.safetensors"));

    let model = Model::build_seeded(backbone, CLASSES, Device::Cpu, 1).unwrap();
    let meta = metadata(&weights);
    let names = |list: &[(String, Tensor)]| list.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>().join(",");
    for (what, ours, theirs) in [
        ("parameter", names(model.named_parameters()), &meta["parameters"]),
        ("buffer", names(model.named_buffers()), &meta["buffers"]),
    ] {
        if &ours != theirs {
            return Err(format!("{what} names or order differ:\n ours:        {ours}\n torchvision: {theirs}"));
        }
    }
    if meta["head"] != backbone.head() {
        return Err(format!("torchvision's head is `{}`, Backbone::head() says `{}`", meta["head"], backbone.head()));
    }
    let loaded = model.load_state(&weights, true).map_err(|e| e.to_string())?;
    assert_eq!(loaded.loaded, model.named_parameters().len() + model.named_buffers().len());
    assert!(loaded.ignored_head.is_empty());
    let reference = read(&logits_file);

    let mut figures = Vec::new();
    for (h, w) in sizes {
        let x = &reference[&format!("input.{h}x{w}")];
        let y = tch::no_grad(|| model.forward(x, ForwardMode::EVAL)).unwrap();
        figures
            .push(Figure { what: format!("eval {h}x{w}"), err: rel_err(&y, &reference[&format!("logits.{h}x{w}")]) });
    }
    let (h, w) = sizes[0];
    let y = tch::no_grad(|| model.forward(&reference[&format!("input.{h}x{w}")], TRAIN_NO_DROPOUT)).unwrap();
    figures.push(Figure { what: format!("train {h}x{w}"), err: rel_err(&y, &reference["train.logits"]) });
    let mut worst = 0f64;
    for (n, t) in model.named_buffers() {
        let want = &reference[&format!("train.state.{n}")];
        if n.ends_with("num_batches_tracked") {
            if t.kind() != Kind::Int64 || !t.equal(want) {
                return Err(format!("{n} is {t:?}, torchvision has {want:?}"));
            }
        } else {
            worst = worst.max(rel_err(t, want));
        }
    }
    figures.push(Figure { what: "running stats after train".into(), err: worst });

    Ok(figures)
}

/// One reference run for every backbone (starting Python and torch costs more than most
/// checks), then every check; all figures are printed before the verdict.
#[test]
fn every_backbone_matches_torchvision() {
    let _bound = sweep_tests::bound(600);
    // Applies to the libtorch calls of this test's thread (OpenMP's thread count is per thread).
    tch::set_num_threads(1);
    let backbones: Vec<Backbone> = CASES.iter().map(|(b, _)| *b).collect();
    let dir = references(&backbones);
    let mut failures = Vec::new();
    for b in backbones {
        match check(dir.path(), b) {
            Ok(figures) => {
                for f in &figures {
                    println!("{:>16} {:<28} {:.2e}", b.name(), f.what, f.err);
                    if f.err.is_nan() || f.err > TOLERANCE {
                        failures.push(format!("{}: {} differs by {:.3e}", b.name(), f.what, f.err));
                    }
                }
            }
            Err(e) => failures.push(format!("{}: {e}", b.name())),
        }
    }
    assert!(failures.is_empty(), "differences from torchvision beyond {TOLERANCE:e}:\n{}", failures.join("\n"));
}

#[test]
fn every_backbone_has_a_parity_case() {
    let _bound = sweep_tests::bound(600);
    for b in Backbone::all() {
        assert!(CASES.iter().any(|(c, _)| *c == b), "{} has no parity case", b.name());
        assert!(CASES.iter().all(|(_, s)| s.iter().all(|&(h, w)| h.min(w) >= b.min_image_size() as i64)));
    }
}

#[test]
fn a_missing_python_fails_and_says_to_run_make_test() {
    let _bound = sweep_tests::bound(600);
    let e = find_python(Some(PathBuf::from("/nonexistent/bin/python"))).unwrap_err();
    assert!(e.contains("make test") && e.contains("/nonexistent/bin/python"), "{e}");
    // A Python without torchvision.
    if Path::new("/bin/false").exists() {
        let e = find_python(Some(PathBuf::from("/bin/false"))).unwrap_err();
        assert!(e.contains("make test"), "{e}");
    }
}

/// Python run by [`export_download_path_offline`]: torchvision's weight download
/// (`WeightsEnum.get_state_dict`) is replaced by a random state_dict of the right architecture —
/// densenet121's in the checkpoints' legacy key format (`norm.1`, `conv.2`, …) — recording which
/// weights were asked for; then the tool's real ImageNet path runs.
const OFFLINE_EXPORT: &str = r#"
import sys, re, torch, torchvision
from torchvision.models._api import WeightsEnum
sys.path.insert(0, sys.argv[1])
import export_torchvision_weights as ex

asked = []
def fake_get_state_dict(self, *args, **kwargs):
    asked.append(repr(self))
    name = next(n for n, s in ex.BACKBONES.items() if s.weights_enum == type(self).__name__)
    torch.manual_seed(11)
    sd = ex.build(name).state_dict()
    if name.startswith("densenet"):
        legacy = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        sd = {(m.group(1) + "." + m.group(2)) if (m := legacy.match(k)) else k: v for k, v in sd.items()}
    return sd
WeightsEnum.get_state_dict = fake_get_state_dict

expected = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2", "resnet101": "ResNet101_Weights.IMAGENET1K_V2",
    "resnet152": "ResNet152_Weights.IMAGENET1K_V2", "vgg16_bn": "VGG16_BN_Weights.IMAGENET1K_V1",
    "efficientnet_b0": "EfficientNet_B0_Weights.IMAGENET1K_V1",
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V2", "densenet121": "DenseNet121_Weights.IMAGENET1K_V1",
}
got = {n: repr(ex.imagenet_weights(n)) for n in ex.BACKBONES}
assert got == expected, got
assert ex.main(["--out", sys.argv[2]] + sys.argv[3:]) == 0
assert asked == [expected[n] for n in sys.argv[3:]], asked
print("asked:", ",".join(asked))
"#;

#[test]
fn export_tool_random_weights_load_into_the_worker() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let help = run_tool("export_torchvision_weights.py", &["--help".into()]);
    assert!(help.contains("non-commercial research"), "{help}");
    assert!(Backbone::all().all(|b| help.contains(b.name())), "--help lists every backbone:\n{help}");

    let small = [Backbone::Resnet18, Backbone::EfficientnetB0, Backbone::MobilenetV2, Backbone::Densenet121];
    let mut args = vec!["--random".to_string(), "--out".into(), dir.path().to_str().unwrap().into()];
    args.extend(small.iter().map(|b| b.name().to_string()));
    let log = run_tool("export_torchvision_weights.py", &args);
    assert!(!log.contains("NOTICE"), "random weights need no licence notice:\n{log}");
    for b in small {
        let path = dir.path().join(format!("{}.safetensors", b.name()));
        assert_eq!(metadata(&path)["backbone"], b.name());
        // A 102-class model takes everything but the 1000-class head.
        let m = Model::build(b, 102, Device::Cpu).unwrap();
        let loaded = m.load_weights(&path).unwrap_or_else(|e| panic!("{}: {e}", b.name()));
        assert_eq!(loaded.loaded, m.state_dict().len() - 2, "{}", b.name());
        let head = b.head();
        assert_eq!(loaded.ignored_head, vec![format!("{head}.bias"), format!("{head}.weight")]);
        let file = read(&path);
        for (n, t) in m.state_dict() {
            if !m.is_head(&n) {
                assert!(t.equal(&file[&n]), "{}: {n} not loaded", b.name());
            }
        }
        // The head can be loaded only with a matching shape, and the error names it.
        let e = m.load_state(&path, true).unwrap_err();
        assert!(
            matches!(&e, ModelError::ShapeMismatch { name, found, .. } if name == &format!("{head}.weight") && found[0] == 1000),
            "{e}"
        );
    }
    // Another backbone's file: the first missing tensor is named.
    let e = Model::build(Backbone::MobilenetV2, 3, Device::Cpu)
        .unwrap()
        .load_weights(&dir.path().join("efficientnet_b0.safetensors"))
        .unwrap_err();
    assert!(matches!(&e, ModelError::MissingTensor { name, .. } if name == "features.1.conv.0.0.weight"), "{e}");
}

#[test]
fn export_download_path_offline() {
    let _bound = sweep_tests::bound(600);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(python())
        .args(["-c", OFFLINE_EXPORT])
        .arg(repo_root().join("tools"))
        .arg(dir.path())
        .args(["densenet121", "resnet18"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("licensed for non-commercial research"), "the licence notice:\n{stderr}");
    assert!(stdout.contains("asked: DenseNet121_Weights.IMAGENET1K_V1,ResNet18_Weights.IMAGENET1K_V1"), "{stdout}");
    for b in [Backbone::Densenet121, Backbone::Resnet18] {
        let path = dir.path().join(format!("{}.safetensors", b.name()));
        assert!(metadata(&path)["weights"].contains("IMAGENET1K_V1"));
        let m = Model::build(b, 102, Device::Cpu).unwrap();
        let loaded = m.load_weights(&path).unwrap_or_else(|e| panic!("{}: {e}", b.name()));
        assert_eq!(loaded.loaded, m.state_dict().len() - 2);
    }
}
