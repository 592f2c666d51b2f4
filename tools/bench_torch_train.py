#!/usr/bin/env python3
"""PyTorch eager baseline of `sweep-worker bench`: training steps per second of a torchvision
backbone (random init, all layers training, Adam, cross-entropy) on random images.

Same work as `sweep-worker bench`: batch B of S×S images, forward in train mode, loss, backward,
Adam step; fp16 = torch.autocast(float16) around forward and loss, fp32 master weights, no
GradScaler (the Rust side has none either). Prints one JSON object.

    python tools/bench_torch_train.py --backbone resnet50 --batch 64 --image-size 224 \
        --steps 30 --warmup 5 --precision fp16 --device cuda:0
"""

import argparse
import json
import time

import torch
import torchvision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, a.backbone)(weights=None).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, 3, a.image_size, a.image_size, device=device)
    y = torch.randint(0, 1000, (a.batch,), device=device)
    fp16 = a.precision == "fp16"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Each phase timed as `sweep-worker bench` times it: forward and loss; zeroing the
    # gradients and backward; the optimizer's step (on CUDA, each ends with a synchronisation).
    phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def step() -> None:
        t = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        sync()
        forward = time.perf_counter() - t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        backward = time.perf_counter() - t
        opt.step()
        sync()
        optimizer = time.perf_counter() - t
        phases["forward"] += forward
        phases["backward"] += backward - forward
        phases["optimizer"] += optimizer - backward

    for _ in range(a.warmup):
        step()
    sync()
    for k in phases:
        phases[k] = 0.0
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    print(json.dumps({
        "implementation": "pytorch-eager",
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": a.backbone,
        "precision": a.precision,
        "batch": a.batch,
        "image_size": a.image_size,
        "steps": a.steps,
        "seconds": seconds,
        "images_per_second": a.batch * a.steps / seconds,
        "phases": {k: v / a.steps for k, v in phases.items()},
    }))


if __name__ == "__main__":
    main()
