#!/usr/bin/env python3
"""One training step, `sweep-worker bench` against PyTorch eager (`tools/bench_torch_train.py`),
side by side in one command: for each backbone the two run alternately, ROUNDS times each, with
the same model, batch, image size and threads, and the medians are printed with their ratio
(sweep / PyTorch: above 1 is faster) and where a step's time goes (forward, backward, optimizer).
The worker also runs with glibc's malloc defaults (SWEEP_MALLOC=default) and with the other
layout of its Adam than training uses on the device (--adam flat on the CPU, --adam loop on
CUDA), so that what each of those changes shows in the same table.

    make build && .venv/bin/python tools/bench_step_ratio.py            # the CPU set below
    .venv/bin/python tools/bench_step_ratio.py --device cuda:0 --precision fp16 \\
        --case resnet50:64:224 --rounds 3

Settings: --case BACKBONE:BATCH:SIZE (repeatable; default: resnet18 32 at 64 px, resnet50 8 at
160 px, vgg16_bn 8 at 96 px), --threads (CPU intra-op threads, default 2), --steps, --warmup,
--rounds, --worker (default target/release/sweep-worker).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CASES = ["resnet18:32:64", "resnet50:8:160", "vgg16_bn:8:96"]


def run(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", help="BACKBONE:BATCH:SIZE (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--worker", default=os.path.join(ROOT, "target", "release", "sweep-worker"))
    a = ap.parse_args()
    if not os.path.exists(a.worker):
        sys.exit(f"{a.worker} does not exist: build it first (make build)")
    rows = []
    for case in a.case or DEFAULT_CASES:
        try:
            backbone, batch, size = case.split(":")
            int(batch), int(size)
        except ValueError:
            sys.exit(f"--case {case!r} is not BACKBONE:BATCH:SIZE, such as resnet50:8:160")
        common = ["--backbone", backbone, "--batch", batch, "--image-size", size, "--steps", str(a.steps),
                  "--warmup", str(a.warmup), "--precision", a.precision]
        sweep_cmd = [a.worker, "--threads", str(a.threads), "--devices", a.device, "bench", *common, "-o", "json"]
        torch_cmd = [sys.executable, os.path.join(HERE, "bench_torch_train.py"), *common, "--device", a.device,
                     "--threads", str(a.threads)]
        sweep_runs, torch_runs, default_runs, other_runs = [], [], [], []
        # The worker as it runs (its malloc settings, `worker/src/alloc.rs`), and with glibc's
        # defaults (SWEEP_MALLOC=default): what those settings change, in the same command.
        default_env = dict(os.environ, SWEEP_MALLOC="default")
        for _ in range(a.rounds):
            sweep_runs.append(run(sweep_cmd))
            torch_runs.append(run(torch_cmd))
            default_runs.append(run(sweep_cmd, default_env))
            # The other Adam layout (`worker/src/adam.rs`): flat buffers on the CPU, the loop on CUDA.
            other = "flat" if a.device == "cpu" else "loop"
            other_runs.append(run([*sweep_cmd, "--adam", other]))
        med = lambda runs, f: statistics.median(f(r) for r in runs)  # noqa: E731
        s_ips = med(sweep_runs, lambda r: r["images_per_second"])
        t_ips = med(torch_runs, lambda r: r["images_per_second"])
        d_ips = med(default_runs, lambda r: r["images_per_second"])
        o_ips = med(other_runs, lambda r: r["images_per_second"])
        o_opt = med(other_runs, lambda r: r["phases"]["optimizer"]) * 1e3
        phase = lambda runs, k: med(runs, lambda r: r["phases"][k]) * 1e3  # noqa: E731
        rows.append((backbone, batch, size, s_ips, t_ips, s_ips / t_ips, d_ips / t_ips, o_ips / t_ips, o_opt,
                     [(phase(sweep_runs, k), phase(torch_runs, k)) for k in ("forward", "backward", "optimizer")],
                     [r["images_per_second"] / t["images_per_second"] for r, t in zip(sweep_runs, torch_runs)]))
    print(f"{a.device}, {a.precision}, {a.threads} threads, median of {a.rounds} alternating runs of {a.steps} steps")
    print("| backbone | batch | px | sweep img/s | PyTorch img/s | ratio | each run | ratio, glibc defaults "
          "| ratio, other Adam layout | forward ms (sweep / torch) | backward ms | optimizer ms | optimizer ms, other layout |")
    print("|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|")
    for backbone, batch, size, s, t, ratio, before, other, other_opt, phases, each in rows:
        cells = " | ".join(f"{x:.1f} / {y:.1f}" for x, y in phases)
        runs = " ".join(f"{r:.2f}" for r in each)
        print(f"| {backbone} | {batch} | {size} | {s:.1f} | {t:.1f} | **{ratio:.2f}×** | {runs} | {before:.2f}× "
              f"| {other:.2f}× | {cells} | {other_opt:.1f} |")


if __name__ == "__main__":
    main()
