"""Files shipped inside the package: the demo model trained by ``vlmexport train --recipe demo``."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CheckpointError

ASSETS = Path(__file__).parent
DEMO_MODEL = ASSETS / "demo"


def demo_model_dir() -> Path:
    """The shipped demo model (HF layout: config.json, model.safetensors, tokenizer.model, ...)."""
    if not (DEMO_MODEL / "model.safetensors").is_file():
        raise CheckpointError(f"{DEMO_MODEL}: the demo model is missing from this installation; reinstall vlmexport "
                              "or train one with `vlmexport train --recipe demo --out runs/demo`")
    return DEMO_MODEL
