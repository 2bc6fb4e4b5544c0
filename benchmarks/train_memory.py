"""Estimate vs measured peak RSS of `vlmexport train` on CPU (docs/training.md's table).

A random-weight model with bench-s's decoder (16 x 1024, FFN 2816, two experts, 32k vocab;
ViT-B/16 at 224 px), the fuse stage (visual experts + connector train, the language
expert and the ViT frozen), a few steps per configuration, each in its own process under
``/usr/bin/time -v``; the estimate is what the same command prints with ``--estimate``.

    python benchmarks/train_memory.py --out /tmp/train-mem [--steps 2] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

CONFIGS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def _run(cmd: list[str]) -> tuple[str, int]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return proc.stdout + proc.stderr, kb * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated config indices to run (default: all)")
    a = ap.parse_args()
    model = a.out / "bench-s"
    if not (model / "config.json").is_file():
        from vlmexport.benchmark import write_synthetic_checkpoint

        write_synthetic_checkpoint("bench-s", model, dtype="bfloat16")
    results = json.loads((a.out / "results.json").read_text()) if (a.out / "results.json").is_file() else {}
    picks = [CONFIGS[int(i)] for i in a.only.split(",")] if a.only else CONFIGS
    for precision, gc in picks:
        name = f"{precision}{' + grad ckpt' if gc else ''}"
        base = [sys.executable, "-m", "vlmexport.cli", "train", str(model), "--stage", "fuse", "--steps", str(a.steps),
                "--batch-size", str(a.batch_size), "--precision", precision, "--no-verbose",
                "--out", str(a.out / f"run-{precision}-{int(gc)}")] + (["--grad-checkpointing"] if gc else [])
        text, _ = _run(base + ["--estimate", "--nproc", "1"])
        est = float(re.search(r"1 process: ([\d.]+) GiB", text).group(1))
        _, peak = _run(base)
        results[name] = {"estimate_gib": est, "measured_gib": peak / 2**30}
        print(f"{name}: estimate {est:.2f} GiB, measured peak RSS {peak / 2**30:.2f} GiB "
              f"({(est * 2**30 / peak - 1) * 100:+.0f}%)", flush=True)
        (a.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
