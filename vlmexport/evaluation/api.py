"""Library entry points behind ``vlmexport eval`` and ``vlmexport run``."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..assets import demo_model_dir
from ..core.errors import VlmexportError
from ..runtimes.torch_backend import pipeline_from_model_dir
from .metrics import EvalReport
from .options import check_eval_options, check_model_path
from .runner import evaluate


def open_pipeline(path: str | Path | None, device: str = "cpu", backend: str = "auto", precision: str | None = None,
                  cpu_prefill: str = "auto"):
    """A pipeline over a bundle (any backend) or a model directory (torch; default: the shipped demo model).
    ``cpu_prefill``: ``vlmexport.load``'s (a bundle only)."""
    if path is not None:
        check_model_path(path)
    if path is not None and (Path(path) / "manifest.json").is_file():
        from ..runtimes.loader import load

        return load(path, backend=backend, precision=precision, device=device, cpu_prefill=cpu_prefill)
    if backend not in ("auto", "torch"):
        from ..core.errors import VlmexportError

        raise VlmexportError(f"{path or 'the demo model'} is a model directory, which only the torch backend runs; "
                             f"build a bundle with `vlmexport build` to use {backend}")
    return pipeline_from_model_dir(path if path is not None else demo_model_dir(), device=device)


def jsonl_eval_items(path: str | Path, image_size: int) -> list:
    """First question/answer of every conversation in a LLaVA-style JSONL as evaluation items."""
    from ..data import read_llava_jsonl
    from ..data.synthetic import EvalItem

    items = []
    for rec in read_llava_jsonl(path):
        q, a = rec.turns[0]
        cat = rec.categories[0] if getattr(rec, "categories", None) else "all"
        kind = "yesno" if a.strip().lower() in ("yes", "no") else "open"
        items.append(EvalItem(rec.id, rec.load_image(image_size), cat, q, a, kind, rec.id if kind == "yesno" else None))
    return items


def prepare_eval(path: str | Path | None, split: str = "test", n_per_category: int = 200,
                 data: str | Path | None = None, device: str = "cpu", seed: int = 0, backend: str = "auto",
                 precision: str | None = None, images: int = 1):
    """(pipeline, items, meta) for an evaluation run; opening and reading fail before any work.
    ``images`` 2: each synthetic question follows an in-context example about another image."""
    check_eval_options(split, n_per_category, data)
    if images not in (1, 2) or (images == 2 and data is not None):
        raise VlmexportError(f"--images {images!r}: use 1, or 2 (synthetic data only: a question after an "
                             "in-context example about another image)")
    pipe = open_pipeline(path, device=device, backend=backend, precision=precision)
    size = pipe.preprocess_config.image_size
    if data is not None:
        items = jsonl_eval_items(data, size)
        meta = {"data": str(data)}
    else:
        from ..data import SyntheticVQA

        gen = SyntheticVQA(image_size=size, seed=seed)
        items = gen.eval_items(split, n_per_category) if images == 1 else gen.two_image_items(split, n_per_category)
        meta = {"split": split, "n_per_category": n_per_category, "seed": seed, "images": images}
    meta["model"] = str(path if path is not None else demo_model_dir())
    return pipe, items, meta


def evaluate_path(path: str | Path | None, split: str = "test", n_per_category: int = 200,
                  data: str | Path | None = None, device: str = "cpu", seed: int = 0, backend: str = "auto",
                  precision: str | None = None, progress: Callable[[int, int], None] | None = None,
                  images: int = 1) -> EvalReport:
    pipe, items, meta = prepare_eval(path, split, n_per_category, data, device, seed, backend, precision, images)
    return evaluate(pipe, items, progress=progress, meta=meta)
