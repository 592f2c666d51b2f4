#!/usr/bin/env python3
"""Export torchvision's ImageNet weights as the .safetensors files `sweep-worker` reads.

A sweep with `model.weights: imagenet` loads `<weights dir>/<backbone>.safetensors`, where the
weights directory is the worker's `--weights-dir` option or the SWEEP_WEIGHTS_DIR environment
variable. This tool creates those files: for each backbone it builds the torchvision model with
the recipe's pretrained weights (downloaded by torchvision into its cache, so it needs internet
access once), and writes the model's full `state_dict` — parameters and BatchNorm buffers under
torchvision's names, the 1000-class ImageNet head included (the worker replaces the head and
ignores it) — to `<out dir>/<backbone>.safetensors`.

Weights (the recipe's, torchvision's DEFAULT where the recipe names none):
    resnet50   ResNet50_Weights.IMAGENET1K_V2       resnet152        ResNet152_Weights.IMAGENET1K_V2
    vgg16_bn   VGG16_BN_Weights.IMAGENET1K_V1       resnet18/34/101  ResNet*_Weights.DEFAULT
    efficientnet_b0, mobilenet_v2, densenet121      *_Weights.DEFAULT

ImageNet weights are licensed for non-commercial research only: check the licence before any
other use. `--random` writes randomly initialised weights in the same layout instead (no
download, no licence question): for testing a setup offline.

Examples:
    .venv/bin/python tools/export_torchvision_weights.py --out weights            # every backbone
    .venv/bin/python tools/export_torchvision_weights.py --out weights resnet50 vgg16_bn
    SWEEP_WEIGHTS_DIR=$PWD/weights target/release/sweep-worker ...
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    """How to build a backbone: torchvision builder function, weights enum, the enum member the
    recipe uses, and the module path of the classification head."""

    builder: str
    weights_enum: str
    weights: str
    head: str


BACKBONES: dict[str, Spec] = {
    "resnet18": Spec("resnet18", "ResNet18_Weights", "DEFAULT", "fc"),
    "resnet34": Spec("resnet34", "ResNet34_Weights", "DEFAULT", "fc"),
    "resnet50": Spec("resnet50", "ResNet50_Weights", "IMAGENET1K_V2", "fc"),
    "resnet101": Spec("resnet101", "ResNet101_Weights", "DEFAULT", "fc"),
    "resnet152": Spec("resnet152", "ResNet152_Weights", "IMAGENET1K_V2", "fc"),
    "vgg16_bn": Spec("vgg16_bn", "VGG16_BN_Weights", "IMAGENET1K_V1", "classifier.6"),
    "efficientnet_b0": Spec("efficientnet_b0", "EfficientNet_B0_Weights", "DEFAULT", "classifier.1"),
    "mobilenet_v2": Spec("mobilenet_v2", "MobileNet_V2_Weights", "DEFAULT", "classifier.1"),
    "densenet121": Spec("densenet121", "DenseNet121_Weights", "DEFAULT", "classifier"),
}

LICENCE_NOTICE = (
    "NOTICE: torchvision's ImageNet weights are licensed for non-commercial research only "
    "(they derive from ImageNet, whose terms restrict use to non-commercial research). "
    "Check the licence before any other use."
)


def imagenet_weights(name: str):
    """The torchvision weights enum member the recipe uses for backbone `name`."""
    import torchvision.models as models

    spec = BACKBONES[name]
    return getattr(getattr(models, spec.weights_enum), spec.weights)


def build(name: str, weights=None):
    """torchvision's `name` model: with `weights` (an enum member) or randomly initialised from
    torch's global generator when `weights` is None."""
    import torchvision.models as models

    return getattr(models, BACKBONES[name].builder)(weights=weights)


def contiguous_state_dict(model) -> dict:
    """The model's state_dict as detached, contiguous CPU tensors (what safetensors needs)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    """Writes `tensors` to `path` atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export(name: str, out_dir: str, random: bool, seed: int) -> str:
    """Writes `<out_dir>/<name>.safetensors` and returns its path."""
    import torch
    import torchvision

    if random:
        torch.manual_seed(seed)
        model = build(name)
        source = f"random initialisation (torch.manual_seed({seed}))"
    else:
        weights = imagenet_weights(name)
        model = build(name, weights)
        source = f"{weights!r}"
    path = os.path.join(out_dir, f"{name}.safetensors")
    meta = {"backbone": name, "weights": source, "torchvision": torchvision.__version__}
    save(contiguous_state_dict(model), path, meta)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="export_torchvision_weights.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "backbones",
        nargs="*",
        metavar="BACKBONE",
        help=f"backbones to export (default: all): {', '.join(BACKBONES)}",
    )
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="directory to write <backbone>.safetensors into (created if missing)")
    p.add_argument(
        "--random",
        action="store_true",
        help="write randomly initialised weights in the same layout instead of downloading ImageNet weights (offline tests)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    args = p.parse_args(argv)
    unknown = [b for b in args.backbones if b not in BACKBONES]
    if unknown:
        p.error(f"unknown backbone(s) {', '.join(unknown)}; choose from {', '.join(BACKBONES)}")
    if not args.backbones:
        args.backbones = list(BACKBONES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import safetensors  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        print(f"error: {e}; install the project's Python environment with `make venv`", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if not args.random:
        print(LICENCE_NOTICE, file=sys.stderr)
    for name in args.backbones:
        path = export(name, args.out, args.random, args.seed)
        print(f"{name}: wrote {path}", flush=True)
    if not args.random:
        print(LICENCE_NOTICE, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
