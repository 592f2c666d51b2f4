#!/usr/bin/env python3
"""Reference outputs of torchvision models, for the worker's parity test (worker/tests/parity.rs).

For each CASE (`BACKBONE[:SIZE[,SIZE...]]`, SIZE = `N` or `HxW`, default `--sizes`) this builds
torchvision's model with random weights (`weights=None` after `torch.manual_seed(--seed)`),
replaces the classification head by a new `nn.Linear(in_features, --classes)` as the recipe
does, and writes into `--out`:

* `<backbone>.safetensors`: the model's full state_dict (parameters and buffers, contiguous),
  with metadata `parameters` and `buffers` (the names in `named_parameters()` /
  `named_buffers()` order, comma-separated), `head`, `num_classes` and `calibration`.
* `<backbone>.logits.safetensors`: for each size, `input.<H>x<W>` (a seeded `randn` batch of 2)
  and `logits.<H>x<W>` (fp32 logits in eval mode). With `--train`, also a training-mode forward
  of the first size's input with dropout and stochastic depth off (`model.train()`, then
  Dropout and StochasticDepth modules put back in eval mode): `train.logits`, and
  `train.state.<name>` for every buffer after it (BatchNorm running statistics updated with
  momentum 0.1, `num_batches_tracked` incremented).

Unless `--no-calibrate`, BatchNorm layers are first made non-trivial, so that the parity test
proves every buffer is loaded into the right place: weights drawn uniform in [0.5, 1.5], biases
in [-0.2, 0.2], and running statistics the batch statistics of one training-mode pass over a
seeded random batch of 2 images at the first size (`num_batches_tracked` = 1). The network is
then well scaled in eval mode, so its logits depend on its input; with torchvision's init
(running statistics 0 and 1) the eval logits of deep networks hardly vary with the input. All
of this comes after `torch.manual_seed`, so equal arguments give equal files.

Example:
    .venv/bin/python tools/parity_reference.py --out /tmp/ref --classes 5 --train \\
        vgg16_bn:32,97,224 resnet18:64,97x80 mobilenet_v2
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torchvision_weights import BACKBONES, build, save  # noqa: E402


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    size = (int(h), int(w or h))
    if min(size) < 1:
        raise ValueError(f"bad size {text!r}")
    return size


def parse_case(text: str, default_sizes: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    name, _, sizes = text.partition(":")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return name, [parse_size(s) for s in sizes.split(",")] if sizes else default_sizes


def replace_head(model, head: str, classes: int) -> None:
    """`model.<head> = nn.Linear(<head>.in_features, classes)` for a dotted module path."""
    from torch import nn

    parent_path, _, leaf = head.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
    new = nn.Linear(old.in_features, classes)
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def train_without_randomness(model) -> None:
    """`model.train()`, with dropout and stochastic depth left in eval mode (identity)."""
    from torch import nn
    from torchvision.ops import StochasticDepth

    model.train()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, StochasticDepth)):
            m.eval()


def calibrate(model, size: tuple[int, int]) -> None:
    """Random BatchNorm affine parameters, then running statistics equal to the batch statistics
    of one training-mode pass (momentum None: a cumulative average, here of one batch), so that
    the network is well scaled in eval mode and its logits depend on its input."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.momentum = None
        train_without_randomness(model)
        model(torch.randn(2, 3, *size))
        for m in norms:
            m.momentum = 0.1
    model.eval()


def reference(name: str, sizes, args) -> None:
    import torch

    head = BACKBONES[name].head
    torch.manual_seed(args.seed)
    model = build(name)
    replace_head(model, head, args.classes)
    if args.calibrate:
        calibrate(model, sizes[0])
    model.eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "backbone": name,
        "head": head,
        "num_classes": str(args.classes),
        "parameters": ",".join(n for n, _ in model.named_parameters()),
        "buffers": ",".join(n for n, _ in model.named_buffers()),
        "calibration": "bn-random-affine+1-train-pass" if args.calibrate else "none",
    }
    save(state, os.path.join(args.out, f"{name}.safetensors"), meta)

    out = {}
    with torch.no_grad():
        for h, w in sizes:
            x = torch.randn(2, 3, h, w)
            out[f"input.{h}x{w}"] = x
            out[f"logits.{h}x{w}"] = model(x).contiguous()
        if args.train:
            h, w = sizes[0]
            train_without_randomness(model)
            out["train.logits"] = model(out[f"input.{h}x{w}"]).contiguous()
            for n, b in model.named_buffers():
                out[f"train.state.{n}"] = b.detach().clone().contiguous()
            model.eval()
    sizes_meta = ",".join(f"{h}x{w}" for h, w in sizes)
    save(out, os.path.join(args.out, f"{name}.logits.safetensors"), {"sizes": sizes_meta, "backbone": name})
    # How much the logits depend on the input (a weak reference if they hardly do).
    spread = min(
        float((out[f"logits.{h}x{w}"][0] - out[f"logits.{h}x{w}"][1]).abs().max() / out[f"logits.{h}x{w}"].abs().max())
        for h, w in sizes
    )
    print(f"{name}: {sizes_meta} (min relative spread of logits between the two inputs: {spread:.3f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="parity_reference.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("cases", nargs="+", metavar="CASE", help="BACKBONE[:SIZE[,SIZE...]]")
    p.add_argument("--out", "-o", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=5, help="outputs of the new head (default 5)")
    p.add_argument("--sizes", default="64", help="default input sizes, comma-separated N or HxW (default 64)")
    p.add_argument("--train", action="store_true", help="also a training-mode forward (see above)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="keep torchvision's BatchNorm init")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: the parity test runs the worker's side with one too, and "
        "results can depend on the thread count in the last bits)",
    )
    args = p.parse_args(argv)
    try:
        default_sizes = [parse_size(s) for s in args.sizes.split(",")]
        cases = [parse_case(c, default_sizes) for c in args.cases]
    except ValueError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    import torch

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    for name, sizes in cases:
        reference(name, sizes, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
