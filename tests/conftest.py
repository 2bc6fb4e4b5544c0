"""Shared fixtures: a tiny SentencePiece tokenizer and tiny seeded models of every architecture.

Everything is built in the test session (nothing is downloaded):

- ``tokenizer_path`` / ``tokenizer``: a 320-piece SentencePiece model trained on the
  synthetic VQA corpus (byte fallback, so any text encodes), well under a second.
- ``tiny_model(arch, seed=0, jitter=False, **config_overrides)``: a seeded
  ``get_architecture(arch)(A.tiny_config(...))`` in eval mode.
- ``tiny_model_dir(arch, ...)``: the same model saved with ``save_pretrained`` (with the
  tiny tokenizer and ``PreprocessConfig(image_size=32)``) into a fresh temporary
  directory; returns the directory.
- ``images``: a few small deterministic RGB images (numpy HxWx3 uint8).

The plain functions ``build_tiny_model`` and ``jitter_parameters`` are the helpers
behind the fixtures; test modules reach them through the fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from vlmexport.core.preprocess import PreprocessConfig
from vlmexport.core.tokenizer import Tokenizer, train_tokenizer
from vlmexport.models import VLM, architectures, get_architecture, seeded_init

from arch_params import accepts_semantics, arch_semantics  # noqa: E402,F401  (re-exported)

# Tiny models run 10-100x faster on one thread than with intra-op threads fighting over
# a shared machine's cores (measured: 5 ms vs 560 ms for an 8-token generate).
torch.set_num_threads(1)

TINY_IMAGE_SIZE = 32  # every architecture's tiny_config uses 32x32 images
TOKENIZER_VOCAB = 320  # = tiny_config().vocab_size


def jitter_parameters(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norm weights, biases, boi/eoi, ...) deterministically.

    ``seeded_init`` sets norm weights to 1 and biases to 0; a test that must notice a
    swapped or dropped norm/bias needs them to differ.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return model


def build_tiny_model(arch: str, seed: int = 0, jitter: bool = False, **overrides) -> VLM:
    """A tiny seeded model of architecture ``arch`` (``tiny_config(**overrides)``), in eval mode."""
    A = get_architecture(arch)
    model = seeded_init(A(A.tiny_config(**overrides)), seed)
    if jitter:
        jitter_parameters(model, seed + 1000)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _user_cache(tmp_path_factory):
    """The runtime's user cache (VLMEXPORT_CACHE: the int8 prefill copies, runtimes/cpu_prefill.py)
    in the test session's temporary directory, not the user's home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLMEXPORT_CACHE", str(tmp_path_factory.mktemp("user-cache")))
        yield


@pytest.fixture(scope="session")
def arch_names() -> list[str]:
    return sorted(architectures())


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    from vlmexport.data import SyntheticVQA

    lines = SyntheticVQA(image_size=TINY_IMAGE_SIZE).corpus(300)
    return train_tokenizer(lines, tmp_path_factory.mktemp("tokenizer") / "tokenizer.model",
                           vocab_size=TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def preprocess_config() -> PreprocessConfig:
    return PreprocessConfig(image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., VLM]:
    """Factory: ``tiny_model("cogvlm", seed=0, jitter=False, **config_overrides)``."""
    return build_tiny_model


@pytest.fixture
def tiny_model_dir(tmp_path_factory, tokenizer_path, preprocess_config) -> Callable[..., Path]:
    """Factory: save a tiny model into a fresh directory and return it.

    ``tiny_model_dir(arch, seed=0, jitter=False, model=None, tokenizer=True, **overrides)``;
    pass ``model=`` to save an existing model instead of building one.
    """

    def make(arch: str, seed: int = 0, jitter: bool = False, model: VLM | None = None,
             tokenizer: bool = True, **overrides) -> Path:
        from vlmexport.models.checkpoint import save_pretrained

        if model is None:
            model = build_tiny_model(arch, seed=seed, jitter=jitter, **overrides)
        out = tmp_path_factory.mktemp(f"{arch}-model") / "model"
        return save_pretrained(model, out, tokenizer_path if tokenizer else None,
                               PreprocessConfig(image_size=model.config.vision_config.image_size))

    return make


@pytest.fixture(scope="session")
def images() -> list[np.ndarray]:
    """Three deterministic RGB images of different sizes and aspect ratios."""
    rng = np.random.default_rng(1234)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((32, 32, 3), (48, 40, 3), (20, 60, 3))]
