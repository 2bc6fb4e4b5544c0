"""Checks of ``eval`` / ``run`` inputs made before a model is opened (one-line errors)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import VlmexportError

SPLITS = ("test", "val")  # synthetic evaluation splits (train is for training)
MAX_PER_CATEGORY = 100_000  # the synthetic set draws images in order: more is hours of work, a typo


def check_eval_options(split: str, n_per_category: int, data) -> None:
    if data is None and split not in SPLITS:
        raise VlmexportError(f"--split {split!r} is not a synthetic evaluation split; use one of {list(SPLITS)}")
    if (not isinstance(n_per_category, int) or isinstance(n_per_category, bool) or n_per_category <= 0
            or n_per_category % 2 or n_per_category > MAX_PER_CATEGORY):
        raise VlmexportError(f"--n-per-category {n_per_category!r}: give an even number from 2 to "
                             f"{MAX_PER_CATEGORY:,} (existence questions come in yes/no pairs), e.g. 200")
    if data is not None and not Path(data).is_file():
        raise VlmexportError(f"--data {data}: no such file; give a LLaVA-style .jsonl file")


def check_model_path(path) -> None:
    """A bundle (manifest.json) or a model directory (config.json); anything else says which it lacks."""
    p = Path(path)
    if not p.exists():
        raise VlmexportError(f"{p}: no such directory; give a bundle (from `vlmexport build`) or a model directory")
    if not p.is_dir():
        raise VlmexportError(f"{p} is a file; give a bundle directory or a model directory")
    if (p / "manifest.json").is_file() or (p / "config.json").is_file():
        return
    if any((p / d).is_dir() for d in ("onnx", "gguf", "engines", "torch")):
        raise VlmexportError(f"{p} looks like a bundle but has no manifest.json (an incomplete copy or an interrupted "
                             "build); copy the whole bundle again or rebuild it with `vlmexport build`")
    raise VlmexportError(f"{p} is neither a bundle (no manifest.json) nor a model directory (no config.json); "
                         "build a bundle with `vlmexport build` or point to a model directory")
