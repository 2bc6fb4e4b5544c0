"""Time the synthetic VQA generator (ms per train sample). A benchmark, not a test:
timings never go into asserts.

    python benchmarks/data_speed.py [--n 200]
"""

from __future__ import annotations

import argparse
import time

from vlmexport.data import SyntheticVQA


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="samples per image size")
    args = ap.parse_args()
    for size in (64, 96):
        gen = SyntheticVQA(image_size=size, seed=0)
        gen.sample("train", 10_000)  # warm-up: fonts, caches
        t = time.perf_counter()
        for i in range(args.n):
            gen.sample("train", 10_000 + i)
        print(f"SyntheticVQA({size}): {(time.perf_counter() - t) / args.n * 1e3:.3f} ms per train sample")


if __name__ == "__main__":
    main()
