#!/usr/bin/env python3
"""torchvision baseline of `worker/benches/input_pipeline.rs`.

The standard torchvision training input pipeline over the images the Rust benchmark generated:
`ImageFolder` (PIL decoding) and a `DataLoader` with `num_workers` worker processes, each image
decoded and transformed every epoch with the transforms sweep applies:

    Resize(256) + CenterCrop(224)          (sweep does these once, when it builds its cache)
    RandomHorizontalFlip()
    RandomAffine(degrees=15, shear=(-10, 10), bilinear)     one warp: rotation + x-shear
    ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3)
    ToTensor() + Normalize(ImageNet mean, std)

Threads: `--threads N` gives the DataLoader N worker processes (each runs with one torch
thread, as DataLoader sets it) and the main process `torch.set_num_threads(N)`; sweep's side
uses N rayon threads to decode and N libtorch intra-op threads to augment. Workers are
persistent, so later epochs do not pay for starting them (the first one does).

Run by the Rust benchmark (`cargo bench -p sweep-worker --bench input_pipeline`), or alone:

    .venv/bin/python tools/bench_torchvision_pipeline.py --root DIR [--threads N] [--json]

where DIR holds one subdirectory of JPEGs per class. With `--json` the last line of the output
is a JSON object: {"threads", "workers", "batch_size", "images", "epochs": [{"epoch",
"seconds", "images", "images_per_second"}], "torch", "torchvision"}.
"""

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="ImageFolder root: one subdirectory of images per class")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DataLoader workers and torch threads")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rotation", type=float, default=15.0, help="degrees")
    ap.add_argument("--shear", type=float, default=10.0, help="degrees")
    ap.add_argument("--jitter", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = ap.parse_args()

    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    size = args.image_size
    resize = round(size * 256 / 224)
    transform = T.Compose(
        [
            T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(size),
            T.RandomHorizontalFlip(),
            T.RandomAffine(
                degrees=args.rotation,
                shear=(-args.shear, args.shear),
                interpolation=T.InterpolationMode.BILINEAR,
                fill=0,
            ),
            T.ColorJitter(brightness=args.jitter, contrast=args.jitter, saturation=args.jitter),
            T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    dataset = ImageFolder(args.root, transform=transform)
    workers = max(0, args.threads)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )
    epochs = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        n = 0
        for images, labels in loader:
            n += images.shape[0]
        seconds = time.perf_counter() - start
        epochs.append({"epoch": epoch, "seconds": seconds, "images": n, "images_per_second": n / seconds})
        print(f"torchvision epoch {epoch}: {n} images in {seconds:.2f} s = {n / seconds:.1f} images/s", file=sys.stderr)
    result = {
        "threads": args.threads,
        "workers": workers,
        "batch_size": args.batch_size,
        "images": len(dataset),
        "epochs": epochs,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
