"""Real servers for the serve tests: ``vlmexport serve`` in a subprocess on a free loopback port.

- ``demo_bundle``: the shipped demo model built into an ONNX fp32 bundle in the test session
  (real answers such as "red", so they can be compared with ``vlmexport run``).
- ``endless_bundle``: a tiny seeded model whose EOS row of the LM head is zero, so greedy
  decoding never stops before max_tokens: a generation that holds its slot for seconds,
  for the queue, timeout and disconnect tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from serve_helpers import Server, png_bytes
from vlmexport.cli import app

pytest.importorskip("fastapi")
pytest.importorskip("openai")


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """Two small scenes the demo model answers about (a red circle, a blue square)."""
    d = tmp_path_factory.mktemp("images")
    red = Image.new("RGB", (96, 96), (255, 255, 255))
    ImageDraw.Draw(red).ellipse((20, 20, 70, 70), fill=(220, 30, 30))
    blue = Image.new("RGB", (80, 100), (255, 255, 255))
    ImageDraw.Draw(blue).rectangle((10, 10, 45, 45), fill=(30, 30, 220))
    out = {}
    for name, img in (("red", red), ("blue", blue)):
        out[name] = d / f"{name}.png"
        img.save(out[name])
    return out


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-bundle"
    r = CliRunner().invoke(app, ["build", "--out", str(out), "--format", "onnx", "--precision", "fp32",
                                 "--no-validate"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def endless_bundle(tmp_path_factory, tokenizer_path, tiny_model) -> Path:
    from vlmexport.core.preprocess import PreprocessConfig
    from vlmexport.models.checkpoint import save_pretrained

    # wide enough that 4000 tokens take well over the endless server's 3 s timeout on an idle machine too
    model = tiny_model("cogvlm", seed=3, max_position_embeddings=4096, hidden_size=256,
                       intermediate_size=1024, num_hidden_layers=6)
    with torch.no_grad():
        model.lm_head_module().weight[model.config.eos_token_id].zero_()  # logit 0: never the greedy argmax
    root = tmp_path_factory.mktemp("endless")
    src = save_pretrained(model, root / "model", tokenizer_path,
                          PreprocessConfig(image_size=model.config.vision_config.image_size))
    out = root / "endless-bundle"
    r = CliRunner().invoke(app, ["build", str(src), "--out", str(out), "--format", "onnx", "--precision", "fp32",
                                 "--no-validate", "--no-reference"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def demo_server(demo_bundle, scenes, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "demo-server.log"
    server = Server(demo_bundle, "--allowed-image-dir", str(scenes["red"].parent), "--max-image-bytes", "200000",
                    "--threads", "1", log=log)
    yield server
    server.close()


@pytest.fixture(scope="module")
def endless_server(endless_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "endless-server.log"
    server = Server(endless_bundle, "--max-concurrency", "1", "--max-queue", "1", "--request-timeout", "3",
                    "--threads", "1", log=log)
    yield server
    server.close()


@pytest.fixture(scope="session")
def noise_png() -> bytes:
    """A PNG of random noise (~300 kB: over the demo server's 200 kB image limit)."""
    rng = np.random.default_rng(0)
    return png_bytes(Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)))
